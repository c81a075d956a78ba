//! The server's log, read from a real process's stderr: JSON lines with a
//! timestamp and a level, the events an operator needs (authentication
//! failures, connections, sessions expiring, locks lost, the state saved),
//! each at its level, and nothing below the level asked for.

mod common;

use std::time::Duration;

use common::*;
use livelock::client::{AcquireOptions, Client, ClientOptions};

/// Every stderr line as a JSON object (each line must be one).
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect()
}

/// The first event whose message contains `text`, if any.
fn event<'a>(events: &'a [serde_json::Value], text: &str) -> Option<&'a serde_json::Value> {
    events.iter().find(|e| {
        e["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(text))
    })
}

fn wait_event(server: &mut ChildGuard, text: &str) -> serde_json::Value {
    server.wait_for(text, |s| event(&json_lines(&s.stderr()), text).cloned())
}

fn options(password: &str, grace: Duration) -> ClientOptions {
    ClientOptions {
        password: Some(password.into()),
        grace,
        client_name: "logged-client".into(),
        ..ClientOptions::default()
    }
}

#[test]
fn json_log_has_the_events_an_operator_needs() {
    let dir = ScratchDir::new("server-log-json");
    let addr = free_addr();
    let mut server = spawn_server_with(
        "server",
        &dir,
        &data_dir(&dir),
        addr,
        "log",
        &[
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--password",
            "pw",
        ],
    );
    let started = wait_event(&mut server, &format!("listening on {addr}"));
    assert_eq!(started["level"], "INFO");
    let timestamp = started["timestamp"].as_str().expect("a timestamp");
    assert!(
        timestamp.starts_with("20") && timestamp.contains('T'),
        "RFC 3339: {timestamp}"
    );

    // A wrong password: refused, and logged as a warning with the peer.
    assert!(Client::connect(addr, &options("wrong", Duration::ZERO)).is_err());
    let refused = wait_event(&mut server, "authentication failed");
    assert_eq!(refused["level"], "WARN");
    assert!(
        refused["fields"]["peer"]
            .as_str()
            .is_some_and(|p| p.contains("127.0.0.1")),
        "{refused}"
    );
    // Connections at DEBUG.
    assert_eq!(
        wait_event(&mut server, "connection accepted")["level"],
        "DEBUG"
    );

    // A lease that runs out: the lock is lost, at INFO, naming the lock.
    let client = Client::connect(addr, &options("pw", Duration::ZERO)).unwrap();
    let lease = AcquireOptions {
        lease: Some(Duration::from_millis(50)),
        ..AcquireOptions::default()
    };
    let _guard = client.acquire_with("leased-lock", lease).unwrap();
    let lost = wait_event(&mut server, "lock lost");
    assert_eq!(lost["level"], "INFO");
    assert_eq!(lost["fields"]["lock"], "leased-lock");

    // A session whose grace runs out after its connection is dropped.
    let graceful = Client::connect(addr, &options("pw", Duration::from_millis(100))).unwrap();
    graceful.acquire("kept-a-while").unwrap().forget();
    drop(graceful); // the connection closes; the session waits 100 ms
    let expired = wait_event(&mut server, "session expired");
    assert_eq!(expired["level"], "INFO");
    assert_eq!(expired["fields"]["client"], "logged-client");
    assert_eq!(expired["fields"]["holds"], 1);

    // Operator acts are logged as warnings, naming who asked.
    let operator = Client::connect(addr, &options("pw", Duration::ZERO)).unwrap();
    let victim = Client::connect(addr, &options("pw", Duration::ZERO)).unwrap();
    victim.acquire("broken").unwrap().forget();
    operator.force_release("broken", 0).unwrap();
    let forced = wait_event(&mut server, "forced release");
    assert_eq!(forced["level"], "WARN");
    assert_eq!(forced["fields"]["lock"], "broken");
    assert_eq!(
        forced["fields"]["by_session"].as_u64(),
        Some(operator.session_id())
    );
    operator.kill_session(victim.session_id()).unwrap();
    let killed = wait_event(&mut server, "session ended by an operator");
    assert_eq!(killed["level"], "WARN");
    assert_eq!(
        killed["fields"]["session"].as_u64(),
        Some(victim.session_id())
    );

    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
    let events = json_lines(&server.stderr());
    assert!(event(&events, "state saved").is_some());
    assert!(event(&events, "stopped").is_some());
    // The password itself is never in the log.
    assert!(!server.stderr().contains("\"pw\""));
}

#[test]
fn text_log_has_timestamps_and_keeps_to_its_level() {
    let dir = ScratchDir::new("server-log-text");
    let addr = free_addr();
    let mut server = start_server_with("server", &dir, &data_dir(&dir), addr, "memory", &[]);
    let client = Client::connect(addr, &ClientOptions::default()).unwrap();
    client.acquire("x").unwrap().release().unwrap();
    client.bye().unwrap();
    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
    let stderr = server.stderr();
    let start = stderr
        .lines()
        .find(|l| l.contains("listening on"))
        .expect("the start line");
    // `2026-12-02T13:59:33.123456Z  INFO livelock::...: listening on ...`
    let (timestamp, rest) = start.split_once(' ').unwrap();
    assert!(timestamp.len() >= 20 && timestamp.ends_with('Z'), "{start}");
    assert!(rest.trim_start().starts_with("INFO"), "{start}");
    // INFO (the default) leaves out DEBUG events such as connections.
    assert!(!stderr.contains("connection accepted"), "{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");

    // LIVELOCK_LOGLEVEL (LiveLock's variable, Python's level names) is honoured.
    let addr = free_addr();
    let mut command = livelock_bin();
    command
        .args(["server", "--durability", "memory", "--listen"])
        .arg(addr.to_string())
        .env("LIVELOCK_LOGLEVEL", "debug");
    let mut server = ChildGuard::spawn("debug-server", &mut command, &dir);
    wait_listening(&mut server, addr);
    // A client name cannot forge a line of the log.
    let forger = ClientOptions {
        client_name: "x\n2026-01-01T00:00:00.000000Z  WARN forged".into(),
        ..ClientOptions::default()
    };
    Client::connect(addr, &forger).unwrap().bye().unwrap();
    let line = server.wait_for("a DEBUG line", |s| {
        s.stderr()
            .lines()
            .find(|l| l.contains("connection accepted"))
            .map(str::to_string)
    });
    assert!(line.contains("DEBUG"), "{line}");
    server.wait_for("the session line", |s| {
        s.stderr().contains("session opened").then_some(())
    });
    let stderr = server.stderr();
    assert!(
        !stderr.lines().any(|l| l.starts_with("2026-01-01")),
        "a forged line: {stderr}"
    );
    assert!(stderr.contains("x\\n2026-01-01"), "escaped: {stderr}");
}
