//! Real `livelock server --durability dump` processes on loopback, stopped
//! the hard ways (`tests/log_crash.rs` has the same for the log):
//! back-to-back SIGTERM restarts on one port and data directory (the
//! successor waits for its predecessor by itself; a graceful session
//! RESUMEs and keeps its lock; fencing tokens keep increasing), a `kill -9`
//! after a restart (the consumed dump brings no phantom hold back), a dump
//! replaced by the operator once the port is closed (the successor reads
//! what is on disk then), a second server on a busy data directory or port
//! (waits, then exits naming the holder), and a panicking event loop (the
//! whole process aborts).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    data_dir, expect_clean_exit, free_addr, graceful, holders, livelock_bin, signal,
    spawn_server_with, start_server_with, wait_listening, wait_until, ChildGuard, ScratchDir,
    WAIT_MAX,
};
use livelock::client::{Client, ClientOptions};

/// A `--durability dump` server (these tests are about the dump).
fn spawn_server(
    what: &str,
    dir: &ScratchDir,
    data_dir: &Path,
    addr: SocketAddr,
    extra: &[&str],
) -> ChildGuard {
    spawn_server_with(what, dir, data_dir, addr, "dump", extra)
}

/// A `--durability dump` server, once it listens.
fn start_server(
    what: &str,
    dir: &ScratchDir,
    data_dir: &Path,
    addr: SocketAddr,
    extra: &[&str],
) -> ChildGuard {
    start_server_with(what, dir, data_dir, addr, "dump", extra)
}

/// Whether process `pid` has `path` (canonical) open.
fn has_open(pid: u32, path: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
}

/// Safety issue, item 2: SIGTERM and an immediate start of the successor,
/// twenty times (every other round the successor is started first and
/// seen waiting). Each successor waits for its predecessor's dump by itself;
/// the graceful holder RESUMEs every time and still holds its lock, and
/// fencing tokens never go back.
#[test]
fn twenty_sigterm_restarts_keep_a_graceful_holder() {
    const ROUNDS: usize = 20;
    let dir = ScratchDir::new("sigterm-rounds");
    let data_dir = data_dir(&dir);
    let addr = free_addr();
    let mut server = start_server("server-0", &dir, &data_dir, addr, &[]);
    let mut holder = Client::connect(addr, &graceful()).expect("connect");
    let held = holder.acquire("x").unwrap();
    let x_token = held.token();
    held.forget();
    let (id, secret) = (holder.session_id(), holder.secret());
    let mut last_token = Client::connect(addr, &ClientOptions::default())
        .unwrap()
        .acquire("probe")
        .unwrap()
        .token();

    let started = Instant::now();
    let lock_file = std::fs::canonicalize(data_dir.join("livelock.lock")).unwrap();
    for round in 1..=ROUNDS {
        let what = format!("server-{round}");
        let mut successor = match round % 2 {
            // SIGTERM, then at once the successor: no waiting for the
            // predecessor here, the successor must.
            1 => {
                signal(&server, libc::SIGTERM);
                spawn_server(&what, &dir, &data_dir, addr, &[])
            }
            // The successor first, certainly waiting: it has the data
            // directory's lock file open and cannot have the lock.
            _ => {
                let mut successor = spawn_server(&what, &dir, &data_dir, addr, &[]);
                wait_until("the successor to wait for the lock", || {
                    has_open(successor.id(), &lock_file)
                });
                assert!(
                    successor.try_wait().is_none() && !successor.stderr().contains("listening"),
                    "round {round}: the successor did not wait: {}",
                    successor.stderr()
                );
                signal(&server, libc::SIGTERM);
                successor
            }
        };
        wait_listening(&mut successor, addr);
        expect_clean_exit(&mut server);
        server = successor;

        holder = Client::resume(addr, id, secret, &graceful())
            .unwrap_or_else(|e| panic!("round {round}: RESUME failed: {e}"));
        let probe = Client::connect(addr, &ClientOptions::default()).expect("connect");
        assert!(
            probe.try_acquire("x").unwrap().is_none(),
            "round {round}: x is free after the restart"
        );
        assert_eq!(holders(&probe, "x"), [id], "round {round}: x's holder");
        let token = probe.acquire("probe").unwrap().token();
        assert!(
            token > last_token,
            "round {round}: token {token} is not above {last_token}"
        );
        last_token = token;
    }
    let elapsed = started.elapsed();
    eprintln!("{ROUNDS} SIGTERM restarts took {elapsed:?}");

    // The holder's session is the one that held x all along.
    holder.release("x").unwrap();
    let probe = Client::connect(addr, &ClientOptions::default()).expect("connect");
    let x = probe.try_acquire("x").unwrap().expect("released");
    assert!(x.token() > x_token, "x's tokens keep increasing");
    drop((x, probe, holder));
    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
}

/// Safety issue, item 1: A holds x over a clean restart, then releases it;
/// C takes x; the server is killed with SIGKILL (no dump). The next start
/// must not bring back the dump the previous start already read: x is
/// free, A's session is gone, and tokens stay above C's.
#[test]
fn a_kill_9_of_the_server_leaves_no_phantom_hold() {
    let dir = ScratchDir::new("kill9-phantom");
    let data_dir = data_dir(&dir);
    let addr = free_addr();
    let mut first = start_server("first", &dir, &data_dir, addr, &[]);
    let a = Client::connect(addr, &graceful()).expect("connect");
    a.acquire("x").unwrap().forget();
    let (a_id, a_secret) = (a.session_id(), a.secret());
    signal(&first, libc::SIGTERM);
    expect_clean_exit(&mut first);
    drop(a);
    assert!(data_dir.join("livelock.dump").is_file(), "dump written");

    let mut second = start_server("second", &dir, &data_dir, addr, &[]);
    assert!(
        !data_dir.join("livelock.dump").exists(),
        "the dump is consumed before clients are served"
    );
    let a = Client::resume(addr, a_id, a_secret, &graceful()).expect("A resumes");
    a.release("x").unwrap();
    let c = Client::connect(addr, &graceful()).expect("connect");
    let c_token = c.try_acquire("x").unwrap().expect("x is free").token();
    let killed = second.kill();
    assert_eq!(killed.signal(), Some(libc::SIGKILL), "{killed}");
    drop((a, c));

    let mut third = start_server("third", &dir, &data_dir, addr, &[]);
    let d = Client::connect(addr, &ClientOptions::default()).expect("connect");
    let phantom = holders(&d, "x");
    assert!(phantom.is_empty(), "a phantom hold of x by {phantom:?}");
    let x = d.try_acquire("x").unwrap().expect("x is free");
    assert!(
        x.token() > c_token,
        "token {} after the crash is not above C's {c_token}",
        x.token()
    );
    let resumed = Client::resume(addr, a_id, a_secret, &graceful());
    assert!(resumed.is_err(), "A's session came back from the old dump");
    assert!(
        !third.stderr().contains("restored"),
        "the third server restored something: {}",
        third.stderr()
    );
    drop((x, d));
    signal(&third, libc::SIGTERM);
    expect_clean_exit(&mut third);
}

/// Reads one `\r\n`-terminated line (bounded by WAIT_MAX).
fn read_line(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(WAIT_MAX)).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => panic!(
                "closed after {:?}",
                String::from_utf8_lossy(&line).into_owned()
            ),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading a reply line: {e}"),
        }
    }
    line
}

/// Safety issue, item 2: once the port is closed the dump is complete and
/// the server writes nothing more; an operator who replaces it then (here
/// with an empty file) decides what the successor reads.
#[test]
fn an_operator_replaced_dump_is_what_the_successor_reads() {
    let dir = ScratchDir::new("replaced-dump");
    let data_dir = data_dir(&dir);
    let addr = free_addr();
    let mut first = start_server("first", &dir, &data_dir, addr, &["--shutdown-support"]);
    let holder = Client::connect(addr, &graceful()).expect("connect");
    holder.acquire("x").unwrap().forget();
    let (id, secret) = (holder.session_id(), holder.secret());

    // LiveLock's inline protocol: CONN, then SHUTDOWN.
    let mut operator = TcpStream::connect_timeout(&addr, WAIT_MAX).expect("connect");
    operator.set_write_timeout(Some(WAIT_MAX)).unwrap();
    operator.write_all(b"CONN\r\n").unwrap();
    let conn = read_line(&mut operator);
    assert!(conn.starts_with(b"+"), "CONN: {conn:?}");
    operator.write_all(b"SHUTDOWN\r\n").unwrap();
    assert_eq!(read_line(&mut operator), b"+1\r\n", "SHUTDOWN's reply");

    wait_until(
        "the port to refuse connections",
        || match TcpStream::connect_timeout(&addr, WAIT_MAX) {
            Ok(_) => false,
            Err(e) => e.kind() == ErrorKind::ConnectionRefused,
        },
    );
    let dump = data_dir.join("livelock.dump");
    assert!(
        dump.is_file(),
        "the port is closed but the dump is not written yet"
    );
    std::fs::write(&dump, b"").unwrap();
    drop((operator, holder));

    let mut second = start_server("second", &dir, &data_dir, addr, &[]);
    expect_clean_exit(&mut first);
    let stderr = second.stderr();
    assert!(
        stderr.contains("ignoring the dump") && stderr.contains("livelock.dump"),
        "no warning about the dump: {stderr}"
    );
    let probe = Client::connect(addr, &ClientOptions::default()).expect("connect");
    assert!(
        probe.try_acquire("x").unwrap().is_some(),
        "x came back although the dump on disk was empty"
    );
    assert!(
        Client::resume(addr, id, secret, &graceful()).is_err(),
        "the session came back although the dump on disk was empty"
    );
    drop(probe);
    signal(&second, libc::SIGTERM);
    expect_clean_exit(&mut second);
}

/// Runs a server that must give up: returns how long it took, and its
/// stderr. Fails if it exits 0 or by a signal.
fn expect_refused_start(
    what: &str,
    dir: &ScratchDir,
    data_dir: &Path,
    addr: SocketAddr,
) -> (Duration, String) {
    let started = Instant::now();
    let mut server = spawn_server(what, dir, data_dir, addr, &["--takeover-wait", "1"]);
    let status = server.wait_exit();
    let elapsed = started.elapsed();
    let stderr = server.stderr();
    assert!(
        status.code().is_some_and(|code| code != 0),
        "{what} exited {status}; stderr: {stderr}"
    );
    (elapsed, stderr)
}

/// Safety issue, item 2: a server never shares a data directory or a port.
/// It waits `--takeover-wait` for the holder, then exits non-zero saying
/// what is held and by which pid; the holder keeps serving.
#[test]
fn a_second_server_on_the_same_data_dir_waits_then_names_the_holder() {
    let dir = ScratchDir::new("second-server");
    let data_dir = data_dir(&dir);
    let addr = free_addr();
    let first = start_server("first", &dir, &data_dir, addr, &[]);
    let holder = Client::connect(addr, &ClientOptions::default()).expect("connect");
    let x = holder.acquire("x").unwrap();
    let pid = first.id();

    // Same data directory, another port.
    let (elapsed, stderr) = expect_refused_start("same-dir", &dir, &data_dir, free_addr());
    let lock_file = data_dir.join("livelock.lock");
    assert!(
        stderr.contains(&lock_file.display().to_string()) && stderr.contains(&format!("pid {pid}")),
        "does not name {} and pid {pid}: {stderr}",
        lock_file.display()
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(10),
        "gave up after {elapsed:?}, not after the 1 s asked for"
    );

    // Another data directory, the same port.
    let other_dir = dir.join("other-data");
    let (elapsed, stderr) = expect_refused_start("same-port", &dir, &other_dir, addr);
    assert!(
        stderr.contains(&addr.to_string()),
        "does not name {addr}: {stderr}"
    );
    // The listener's owner is found through /proc, where it can be read.
    if std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok() {
        assert!(
            stderr.contains(&format!("pid {pid}")),
            "does not name pid {pid}: {stderr}"
        );
    }
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(10),
        "gave up after {elapsed:?}, not after the 1 s asked for"
    );

    // Neither disturbed the first server.
    let probe = Client::connect(addr, &ClientOptions::default()).expect("connect");
    assert!(probe.try_acquire("x").unwrap().is_none(), "x still held");
    assert!(probe.try_acquire("y").unwrap().is_some(), "still serving");
    drop((x, holder, first));
}

/// Item 13: a loop that panics takes the whole process down at once
/// (abort), rather than the other loops serving on without its shard.
#[test]
fn a_panicking_loop_ends_the_process() {
    let dir = ScratchDir::new("panic-loop");
    let data_dir = data_dir(&dir);
    let addr = free_addr();
    let mut command = livelock_bin();
    command
        .env("LIVELOCK_FAULT_PANIC_LOOP", "1")
        .args(["server", "--listen", &addr.to_string(), "--data-dir"])
        .arg(&data_dir)
        .args(["--threads", "2"]);
    let mut server = ChildGuard::spawn("server", &mut command, &dir);
    wait_listening(&mut server, addr);
    // Connections are dealt round robin from loop 0: one of four lands on
    // loop 1. The process may be gone before the last ones connect.
    let connections: Vec<TcpStream> = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&addr, WAIT_MAX).ok())
        .collect();
    let status = server.wait_exit();
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "not aborted: {status}; stderr: {}",
        server.stderr()
    );
    let stderr = server.stderr();
    assert!(
        stderr.contains("event loop 1 panicked") && stderr.contains("aborting"),
        "stderr does not say the loop panicked: {stderr}"
    );
    drop(connections);
}
