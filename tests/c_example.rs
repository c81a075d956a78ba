//! The C example client (`examples/c/livelock_client.c`) against a real
//! server: compiled once with the system C compiler (`$CC`, default `cc`) as
//! the README says to build it, then run as a separate process against an
//! in-process server on 127.0.0.1:0. Checks the grant and the `token N` line,
//! `Busy` and `TimedOut` as exit 75, fencing tokens increasing across runs, a
//! Rust client waiting behind the C client's hold and granted only after the C
//! client released, `Auth` as exit 1, and bad arguments as exit 1.
//!
//! A missing C compiler fails the test: the example is part of the product
//! and must keep compiling and working.
//!
//! Timing: every wait is bounded (WAIT_MAX). The only bounds on elapsed time
//! are lower bounds that load cannot break (a wait of 200 ms does not give up
//! early; a hold of 1.5 s is not cut short).

mod common;

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    bounded, data_dir, free_addr, signal, start_server_with, wait_until, ChildGuard, ScratchDir,
    TestServer, WAIT_MAX,
};
use livelock::client::{AcquireOptions, ClientOptions};
use livelock::protocol::LockRecord;

/// How long the C client holds the lock in the hand-over check.
const HOLD: Duration = Duration::from_millis(1500);

/// Exit statuses of the C client (see the top of livelock_client.c).
const EXIT_ERROR: i32 = 1;
const EXIT_NOT_LOCKED: i32 = 75;

/// The build command of examples/c/README.md, minus the compiler.
const C_FLAGS: &[&str] = &["-std=c11", "-Wall", "-Wextra", "-Werror"];

/// Compiles the example into `dir`; returns the executable. Panics, naming
/// the compiler, when there is none or the source does not compile cleanly.
fn compile(dir: &ScratchDir) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = root.join("examples/c/livelock_client.c");
    let exe = dir.join("livelock_client");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let compiled = Command::new(&cc)
        .args(C_FLAGS)
        .arg("-I")
        .arg(root.join("include"))
        .arg(&source)
        .arg("-o")
        .arg(&exe)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run the C compiler `{cc}` ({err}): a C compiler is required to test \
                 examples/c/livelock_client.c (install one, or point $CC at it)"
            )
        });
    assert!(
        compiled.status.success(),
        "`{cc}` failed on {} ({}):\n{}",
        source.display(),
        compiled.status,
        String::from_utf8_lossy(&compiled.stderr)
    );
    exe
}

/// The compiled client and a directory for the output of its runs.
struct CClient {
    exe: PathBuf,
    dir: ScratchDir,
    /// Numbers the runs: each gets its own output files.
    runs: Cell<u32>,
}

/// How one run of the C client ended.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// From spawn to exit.
    elapsed: Duration,
}

impl CClient {
    /// `livelock_client 127.0.0.1 PORT ARGS...`, with no stdin and no
    /// `LIVELOCK_*` variable of the test's environment (so a developer's
    /// LIVELOCK_PASSWORD cannot leak in); `password` sets LIVELOCK_PASSWORD.
    fn command(&self, addr: SocketAddr, args: &[&str], password: Option<&str>) -> Command {
        let mut command = Command::new(&self.exe);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("LIVELOCK_") {
                command.env_remove(key);
            }
        }
        if let Some(password) = password {
            command.env("LIVELOCK_PASSWORD", password);
        }
        command
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .args(args)
            .stdin(Stdio::null());
        command
    }

    fn spawn(&self, what: &str, command: &mut Command) -> ChildGuard {
        let run = self.runs.get();
        self.runs.set(run + 1);
        ChildGuard::spawn(&format!("{run}-{what}"), command, &self.dir)
    }

    /// Runs the client to completion (bounded by WAIT_MAX).
    fn run(&self, what: &str, command: &mut Command) -> Outcome {
        let start = Instant::now();
        let mut process = self.spawn(what, command);
        let status = process.wait_exit();
        Outcome {
            code: status.code(),
            stdout: process.stdout(),
            stderr: process.stderr(),
            elapsed: start.elapsed(),
        }
    }
}

/// The fencing token of a `token N` line (the whole of stdout).
fn token_of(stdout: &str) -> u64 {
    stdout
        .strip_prefix("token ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("stdout is not one `token N` line: {stdout:?}"))
}

/// A successful run: exit 0, one `token N` line, nothing on stderr.
fn granted(outcome: &Outcome) -> u64 {
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.stderr, "", "{outcome:?}");
    token_of(&outcome.stdout)
}

/// Waits (bounded) for the `token N` line of a run that holds the lock,
/// failing early if it exits first.
fn wait_for_token(process: &mut ChildGuard) -> u64 {
    let start = Instant::now();
    loop {
        let stdout = process.stdout();
        if stdout.ends_with('\n') {
            return token_of(&stdout);
        }
        if let Some(status) = process.try_wait() {
            panic!(
                "exited ({status}) before printing its token; stdout {stdout:?}, stderr: {}",
                process.stderr()
            );
        }
        assert!(
            start.elapsed() < WAIT_MAX,
            "no token printed within {WAIT_MAX:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The client name the C client gives in its HELLO.
fn c_client_name(pid: u32) -> Vec<u8> {
    format!("livelock_client.c:{pid}").into_bytes()
}

/// The client name `TestServer::client` gives in its HELLO.
fn rust_name() -> Vec<u8> {
    ClientOptions::default().client_name.into_bytes()
}

/// (session, token, client name) of each holder.
fn holders(record: &LockRecord) -> Vec<(u64, u64, Vec<u8>)> {
    record
        .holders
        .iter()
        .map(|h| (h.session, h.token, h.client_name.clone()))
        .collect()
}

// ---- the checks ------------------------------------------------------------

/// A free lock: exit 0 and `token N`; released when the client exits.
fn grant_prints_the_token_and_releases(c: &CClient) {
    let server = TestServer::start(1);
    let outcome = c.run("grant", &mut c.command(server.addr, &["grant", "0"], None));
    let token = granted(&outcome);
    assert!(token > 0, "token {token}");
    // A list of hosts: the first that answers is used (nothing listens on
    // 127.0.0.2 at this port).
    let with_hosts = |hosts: &str| {
        let base = c.command(server.addr, &["listed", "0"], None);
        let args: Vec<std::ffi::OsString> = base.get_args().map(|a| a.to_owned()).collect();
        let mut listed = Command::new(base.get_program());
        listed.arg(hosts).args(&args[1..]).stdin(Stdio::null());
        listed
    };
    let outcome = c.run(
        "listed",
        &mut with_hosts(&format!("127.0.0.2,{}", server.addr.ip())),
    );
    assert!(granted(&outcome) > token, "{}", outcome.stderr);
    // None answers: the last one's reason, and the error exit.
    let outcome = c.run("none", &mut with_hosts("127.0.0.2,127.0.0.3"));
    assert_eq!(outcome.code, Some(1), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("cannot connect to 127.0.0.3"),
        "{}",
        outcome.stderr
    );

    let rust = server.client();
    assert!(
        rust.inspect("grant").unwrap().is_none(),
        "still held after the C client exited"
    );
    let guard = rust
        .try_acquire("grant")
        .unwrap()
        .expect("the C client released the lock");
    assert!(
        guard.token() > token,
        "a later grant's token {} is not above the C client's {token}",
        guard.token()
    );
}

/// Held by a Rust client, WAIT_MS 0: exit 75 (`Busy`) at once.
fn busy_exits_75(c: &CClient) {
    let server = TestServer::start(1);
    let rust = server.client();
    let guard = rust.acquire("busy").unwrap();

    let outcome = c.run("busy", &mut c.command(server.addr, &["busy", "0"], None));
    assert_eq!(outcome.code, Some(EXIT_NOT_LOCKED), "{outcome:?}");
    assert_eq!(outcome.stdout, "", "printed a token without the lock");
    assert!(
        outcome
            .stderr
            .contains("busy is held by someone else: Busy (status 1)"),
        "unclear message: {:?}",
        outcome.stderr
    );

    let record = rust.inspect("busy").unwrap().expect("still held");
    assert_eq!(
        holders(&record),
        [(rust.session_id(), guard.token(), rust_name())],
        "the Rust client's hold"
    );
    assert_eq!(record.waiters, 0, "a try-once acquire left a waiter");
}

/// Held by a Rust client, WAIT_MS 200: exit 75 (`TimedOut`), not before the
/// wait ran out, and the expired wait leaves no waiter behind.
fn timed_out_exits_75_after_the_wait(c: &CClient) {
    let server = TestServer::start(1);
    let rust = server.client();
    let _guard = rust.acquire("slow").unwrap();

    let outcome = c.run(
        "timeout",
        &mut c.command(server.addr, &["slow", "200"], None),
    );
    assert_eq!(outcome.code, Some(EXIT_NOT_LOCKED), "{outcome:?}");
    assert_eq!(outcome.stdout, "", "printed a token without the lock");
    assert!(
        outcome
            .stderr
            .contains("slow was still held when the wait ran out: TimedOut (status 2)"),
        "unclear message: {:?}",
        outcome.stderr
    );
    // The server's clock counts whole milliseconds: allow it a little.
    assert!(
        outcome.elapsed >= Duration::from_millis(190),
        "gave up after {:?}",
        outcome.elapsed
    );
    wait_until("the expired waiter to leave the queue", || {
        rust.inspect("slow").unwrap().expect("still held").waiters == 0
    });
}

/// Fencing tokens grow across runs of the C client and grants to a Rust client.
fn tokens_increase_across_runs(c: &CClient) {
    let server = TestServer::start(2);
    let rust = server.client();
    let mut tokens = Vec::new();
    for run in 0..3 {
        let outcome = c.run("counter", &mut c.command(server.addr, &["counter"], None));
        tokens.push((format!("C run {run}"), granted(&outcome)));
    }
    let guard = rust.acquire("counter").unwrap();
    tokens.push(("Rust client".to_string(), guard.token()));
    guard.release().unwrap();
    let outcome = c.run("counter", &mut c.command(server.addr, &["counter"], None));
    tokens.push(("C run after the Rust client".to_string(), granted(&outcome)));

    for pair in tokens.windows(2) {
        assert!(
            pair[1].1 > pair[0].1,
            "tokens do not increase: {:?}",
            tokens
        );
    }
}

/// The C client holds for 1.5 s while a Rust client waits: the Rust client is
/// queued behind the C client's hold and granted only after the C client has
/// released (its RELEASE answered Ok: it held the lock until then).
fn a_waiting_rust_client_gets_the_lock_after_the_c_client_releases(c: &CClient) {
    let server = TestServer::start(2);
    let spawned = Instant::now();
    let hold_ms = HOLD.as_millis().to_string();
    let mut holder = c.spawn(
        "holder",
        &mut c.command(server.addr, &["handover", "forever", &hold_ms], None),
    );
    // 1. The C client is granted the lock.
    let c_token = wait_for_token(&mut holder);
    let c_holder = |record: &LockRecord| {
        let found = holders(record);
        assert_eq!(found.len(), 1, "one exclusive holder: {found:?}");
        assert_eq!(found[0].1, c_token, "the C client's token");
        assert_eq!(found[0].2, c_client_name(holder.id()), "the C client");
    };

    let waiter = server.client_with(&ClientOptions {
        client_name: "rust-waiter".to_string(),
        ..ClientOptions::default()
    });
    // The C client held the lock before it printed its token and holds it for
    // HOLD from after printing: until `spawned + HOLD` at least. Past that
    // (a starved test thread) its hold may have ended: then the checks that
    // need it to still be held are skipped; the ordering checks in 3 and 4
    // hold whatever the timing.
    let c_surely_holds = || spawned.elapsed() < HOLD;
    let record = waiter.inspect("handover").unwrap();
    if c_surely_holds() {
        c_holder(&record.expect("held by the C client"));
    }

    // 2. A Rust client asks and is queued behind the C client.
    let mut pending = waiter
        .start_acquire("handover", AcquireOptions::default(), true)
        .unwrap();
    assert!(
        pending.wait_queued(WAIT_MAX).unwrap(),
        "no QUEUED reply nor grant"
    );
    let record = waiter.inspect("handover").unwrap();
    if c_surely_holds() {
        let record = record.expect("held by the C client");
        c_holder(&record);
        assert_eq!(record.waiters, 1, "the Rust client is not queued");
    } else {
        eprintln!("the test thread was slow: the queued-behind-C checks were skipped");
    }

    // 3. The Rust client is granted, not before the C client's hold ended.
    let granted = bounded("the Rust client's grant", move || {
        pending.wait().map(|guard| (Instant::now(), guard))
    });
    let (granted_at, guard) = granted.expect("the Rust client is granted the lock");
    assert!(
        granted_at.duration_since(spawned) >= HOLD,
        "granted {:?} after the C client started, within its hold of {HOLD:?}",
        granted_at.duration_since(spawned)
    );
    assert!(
        guard.token() > c_token,
        "the Rust client's token {} is not above the C client's {c_token}",
        guard.token()
    );

    // 4. The C client's RELEASE and BYE were answered Ok (else exit 1): it
    // held the lock until it released it. And the Rust client now holds it
    // alone: the C client's hold is gone, not shared.
    let status = holder.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "the C client: stdout {:?}, stderr: {}",
        holder.stdout(),
        holder.stderr()
    );
    assert_eq!(holder.stderr(), "");
    let record = waiter.inspect("handover").unwrap().expect("held");
    assert_eq!(
        holders(&record),
        [(waiter.session_id(), guard.token(), b"rust-waiter".to_vec())],
        "only the Rust client holds the lock"
    );
    assert_eq!(record.waiters, 0);
}

/// A server with a password: no password or a wrong one is exit 1 with the
/// `Auth` status named; the right one is granted.
fn auth_errors_exit_1(c: &CClient) {
    let server = TestServer::start_with(1, |config| config.password = Some(b"pw".to_vec()));
    for (what, password) in [("no-password", None), ("wrong-password", Some("nope"))] {
        let outcome = c.run(
            what,
            &mut c.command(server.addr, &["guarded", "0"], password),
        );
        assert_eq!(outcome.code, Some(EXIT_ERROR), "{what}: {outcome:?}");
        assert_eq!(outcome.stdout, "", "{what}: printed a token");
        assert!(
            outcome.stderr.contains("HELLO: Auth (status 37)"),
            "{what}: unclear message: {:?}",
            outcome.stderr
        );
    }
    let outcome = c.run(
        "right-password",
        &mut c.command(server.addr, &["guarded", "0"], Some("pw")),
    );
    granted(&outcome);
}

/// Bad arguments: exit 1 and the usage, without connecting.
fn bad_arguments_exit_1(c: &CClient) {
    let server = TestServer::start(1);
    for (what, args) in [
        ("no-name", &[][..]),
        ("bad-wait", &["name", "soon"][..]),
        ("signed-wait", &["name", "-5"][..]),
        ("bad-hold", &["name", "0", "1s"][..]),
        ("too-many", &["name", "0", "0", "extra"][..]),
    ] {
        let outcome = c.run(what, &mut c.command(server.addr, args, None));
        assert_eq!(outcome.code, Some(EXIT_ERROR), "{what}: {outcome:?}");
        assert!(
            outcome.stderr.contains("usage: livelock_client"),
            "{what}: no usage: {:?}",
            outcome.stderr
        );
    }
    let stats = server.client().stats().unwrap();
    assert_eq!(stats.locks, 0, "a run with bad arguments took a lock");
}

/// The README's "Run" example, as written: against a fresh server started
/// with its defaults (the log in a new data directory), `livelock_client
/// 127.0.0.1 7873 report-42 5000 2000` prints what the README shows.
fn the_readme_example_prints_what_it_shows(c: &CClient) {
    let readme = include_str!("../examples/c/README.md");
    let run = &readme[readme.find("## Run").expect("a Run section")..];
    let block = &run[run.find("```sh").expect("its commands") + 5..];
    let block = &block[..block.find("```").expect("its end")];
    let (command, shown) = block
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("./livelock_client 127.0.0.1 7873 ")?;
            Some((rest, block.lines().skip_while(|l| *l != line).nth(1)?))
        })
        .expect("a ./livelock_client line and its output");
    let args: Vec<&str> = command.split_whitespace().collect();
    let shown = shown.strip_prefix("# ").expect("the output as a comment");
    let dir = ScratchDir::new("c-readme");
    let addr = free_addr();
    let mut server = start_server_with("server", &dir, &data_dir(&dir), addr, "log", &[]);
    let outcome = c.run("readme", &mut c.command(addr, &args, None));
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
    assert_eq!(
        outcome.stdout,
        format!("{shown}\n"),
        "the README shows {shown:?}"
    );
    signal(&server, libc::SIGTERM);
    server.wait_exit();
}

/// One test: the client is compiled once, then each check runs against its
/// own server, one after the other (the only long one is the 1.5 s hold).
#[test]
fn c_example_client_against_a_real_server() {
    let dir = ScratchDir::new("c-example");
    let exe = compile(&dir);
    let c = CClient {
        exe,
        dir,
        runs: Cell::new(0),
    };
    grant_prints_the_token_and_releases(&c);
    busy_exits_75(&c);
    timed_out_exits_75_after_the_wait(&c);
    tokens_increase_across_runs(&c);
    a_waiting_rust_client_gets_the_lock_after_the_c_client_releases(&c);
    auth_errors_exit_1(&c);
    bad_arguments_exit_1(&c);
    the_readme_example_prints_what_it_shows(&c);
}
