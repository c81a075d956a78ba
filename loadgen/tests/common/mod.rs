//! Helpers for the loadgen tests: run the binary with a bounded wait, read
//! fields of its JSON output, and an in-process livelock server.
#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use livelock::config::ServerConfig;
use livelock::server::Server;

/// Longest any loadgen run in the tests may take before it is killed.
pub const RUN_MAX: Duration = Duration::from_secs(60);

pub struct Output {
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the loadgen binary with `args`, killing it after [`RUN_MAX`].
pub fn loadgen(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_livelock-loadgen"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start livelock-loadgen");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_MAX;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for livelock-loadgen") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("livelock-loadgen {args:?} did not finish within {RUN_MAX:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        code: status.code(),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// Runs with `--json -q` and expects success and exactly one JSON object.
pub fn loadgen_json(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--json", "-q"]);
    let out = loadgen(&all);
    assert_eq!(
        out.code,
        Some(0),
        "livelock-loadgen {all:?} failed:\nstdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    let json = out.stdout.trim();
    assert!(
        json.starts_with('{') && json.ends_with('}') && json.lines().count() == 1,
        "not one JSON object: {json}"
    );
    json.to_string()
}

/// The number after `"field":` (the first occurrence), e.g. `num(j, "cycles")`
/// or `num(j, "ping\":{\"count")` for a nested field.
pub fn num(json: &str, field: &str) -> f64 {
    let needle = format!("\"{field}\":");
    let at = json
        .find(&needle)
        .unwrap_or_else(|| panic!("no {field} in {json}"))
        + needle.len();
    let rest = &json[at..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("{field} is not a number in {json}"))
}

/// A lock run's basic health: cycles happened, nothing went wrong.
pub fn assert_healthy(json: &str) {
    assert!(num(json, "cycles") > 0.0, "no cycles: {json}");
    assert!(num(json, "cycles_per_sec") > 0.0, "{json}");
    assert_eq!(num(json, "violations"), 0.0, "{json}");
    assert_eq!(num(json, "errors"), 0.0, "{json}");
}

/// An in-process livelock server on 127.0.0.1:0, stopped on drop.
pub struct TestServer {
    server: Option<Server>,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
        tweak(&mut config);
        let server = Server::start(config).expect("server starts");
        let addr = server.local_addr();
        TestServer {
            server: Some(server),
            addr,
        }
    }

    pub fn url(&self) -> String {
        format!("livelock://{}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            let _ = server.join();
        }
    }
}
