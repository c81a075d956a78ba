//! Real `livelock server --durability log` processes on loopback: kill -9
//! at random moments while a client takes and releases locks, a failing
//! disk (an injected write error), a torn log tail, and a dump replaced
//! by garbage. Whatever was acknowledged before a crash is there after
//! it; nothing released comes back; fencing tokens only go up.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    data_dir, expect_clean_exit, free_addr, graceful, livelock_bin, signal, start_server_with,
    wait_until, ChildGuard, Rng, ScratchDir, WAIT_MAX,
};
use livelock::client::{Client, Error};
use livelock::protocol::Status;

fn start(what: &str, dir: &ScratchDir, addr: SocketAddr) -> ChildGuard {
    start_server_with(what, dir, &data_dir(dir), addr, "log", &[])
}

/// What the client was told, and the one request that may have been cut
/// off by the crash.
#[derive(Default)]
struct Told {
    /// Lock → token of every acknowledged hold not acknowledged released.
    held: BTreeMap<String, u64>,
    /// The request in flight when the server died: (lock, acquire?).
    in_flight: Option<(String, bool)>,
    /// Per lock, the greatest token this client was handed (tokens go up
    /// per lock; each shard counts its own).
    top_token: BTreeMap<String, u64>,
}

/// Takes and releases locks until a request fails (the server is gone).
fn churn(client: &Client, rng: &mut Rng, told: &mut Told, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let name = format!("lock-{}", rng.below(24));
        let acquire = !told.held.contains_key(&name);
        told.in_flight = Some((name.clone(), acquire));
        let result = if acquire {
            client.try_acquire(&name).map(|guard| {
                if let Some(guard) = guard {
                    let token = guard.token();
                    guard.forget();
                    let top = told.top_token.entry(name.clone()).or_default();
                    assert!(token > *top, "{name}: token {token} not above {top}");
                    *top = token;
                    told.held.insert(name.clone(), token);
                }
            })
        } else {
            client.release(&name).map(|()| {
                told.held.remove(&name);
            })
        };
        match result {
            Ok(()) => told.in_flight = None,
            Err(Error::Status(status, message)) => {
                panic!("unexpected refusal {status:?}: {message}")
            }
            Err(_) => return,
        }
    }
}

/// kill -9 at random moments under load, sixteen times: after each restart
/// the session RESUMEs and lists exactly the holds it was told it has
/// (give or take the one request the crash cut off), with their tokens.
#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_hold() {
    let dir = ScratchDir::new("log-kill9");
    let addr = free_addr();
    let mut rng = Rng(0x5eed_1096);
    let mut server = start("first", &dir, addr);
    let mut client = Client::connect(addr, &graceful()).expect("connect");
    let (id, secret) = (client.session_id(), client.secret());
    let mut told = Told::default();
    for round in 0..16 {
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let stop = stop.clone();
            let seed = rng.next();
            std::thread::spawn(move || {
                let mut rng = Rng(seed);
                churn(&client, &mut rng, &mut told, &stop);
                (client, told)
            })
        };
        // A random moment, while the client works.
        std::thread::sleep(Duration::from_millis(rng.range(20, 250)));
        let killed = server.kill();
        assert_eq!(killed.signal(), Some(libc::SIGKILL), "{killed}");
        stop.store(true, Ordering::Relaxed);
        let (old, mut seen) = worker
            .join()
            .expect("the worker ends when the server is gone");
        drop(old);

        server = start(&format!("round {round}"), &dir, addr);
        client = Client::resume(addr, id, secret, &graceful()).expect("the session survives");
        let listed: BTreeMap<String, u64> = client
            .resumed()
            .expect("a resumed client")
            .holds
            .iter()
            .map(|h| (String::from_utf8(h.name.clone()).unwrap(), h.token))
            .collect();
        let mut expected = seen.held.clone();
        if let Some((name, acquire)) = seen.in_flight.take() {
            // Cut off: it may or may not have happened.
            match (acquire, listed.get(&name)) {
                (true, Some(&token)) => {
                    let top = seen.top_token.entry(name.clone()).or_default();
                    assert!(token > *top, "a new token for {name}");
                    *top = token;
                    expected.insert(name, token);
                }
                (false, None) => {
                    expected.remove(&name);
                }
                _ => {}
            }
        }
        assert_eq!(
            listed, expected,
            "round {round}: the holds after the crash are not the acknowledged ones"
        );
        told = seen;
        told.held = expected;
    }
    // Tokens go on above everything handed out before.
    for (name, top) in &told.top_token {
        if !told.held.contains_key(name) {
            let guard = client.try_acquire(name).unwrap().expect("free");
            assert!(
                guard.token() > *top,
                "{name}: a token from before the crashes"
            );
        }
    }
    drop(client);
    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
}

/// A clean shutdown leaves the state in the one dump file (LiveLock's
/// `dump_file_path`); garbage in its place means an empty start with a
/// warning, with tokens still above all handed out before.
#[test]
fn a_garbage_dump_starts_empty_with_tokens_above() {
    let dir = ScratchDir::new("log-garbage");
    let addr = free_addr();
    let mut server = start("first", &dir, addr);
    let client = Client::connect(addr, &graceful()).expect("connect");
    let top = client.acquire("kept").unwrap();
    let top_token = top.token();
    top.forget();
    drop(client);
    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
    let dump = data_dir(&dir).join("livelock.dump");
    assert!(dump.is_file(), "the state is in the dump file");
    std::fs::write(&dump, b"not a dump at all").unwrap();

    let mut second = start("second", &dir, addr);
    assert!(
        second.stderr().contains("WARN"),
        "no warning: {}",
        second.stderr()
    );
    let client = Client::connect(addr, &graceful()).expect("connect");
    assert!(client.inspect("kept").unwrap().is_none(), "started empty");
    let again = client.try_acquire("kept").unwrap().expect("free");
    assert!(again.token() > top_token, "tokens go on above");
    drop((again, client));
    signal(&second, libc::SIGTERM);
    expect_clean_exit(&mut second);
}

/// A log whose last write was torn (garbage after the last whole record)
/// is cut there with a warning; what was acknowledged before is kept.
#[test]
fn a_torn_log_tail_is_cut() {
    let dir = ScratchDir::new("log-torn");
    let addr = free_addr();
    let mut server = start("first", &dir, addr);
    let client = Client::connect(addr, &graceful()).expect("connect");
    let (id, secret) = (client.session_id(), client.secret());
    for i in 0..20 {
        client.acquire(format!("torn-{i}")).unwrap().forget();
    }
    server.kill();
    drop(client);
    let log_dir = data_dir(&dir).join("log");
    let mut files: Vec<_> = std::fs::read_dir(&log_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
        .collect();
    files.sort();
    let last = files.last().expect("a log file");
    let mut bytes = std::fs::read(last).unwrap();
    bytes.extend_from_slice(&[0xa5; 37]);
    std::fs::write(last, bytes).unwrap();

    let mut second = start("second", &dir, addr);
    let client = Client::resume(addr, id, secret, &graceful()).expect("the session survives");
    let holds = client.resumed().unwrap().holds;
    assert_eq!(holds.len(), 20, "every acknowledged hold is back");
    drop(client);
    signal(&second, libc::SIGTERM);
    expect_clean_exit(&mut second);
}

/// The disk fails (an injected write error, as on a full disk): changes
/// are refused with StorageFailed, reads and PING are answered, a grant
/// that depends on a change not yet durable is not sent; once writes
/// succeed again everything goes on by itself.
#[test]
fn a_failing_disk_refuses_changes_and_recovers() {
    let dir = ScratchDir::new("log-fail");
    let addr = free_addr();
    let fail = dir.join("fail-writes");
    let mut command = livelock_bin();
    command
        .args(["server", "--listen", &addr.to_string(), "--data-dir"])
        .arg(data_dir(&dir))
        .args(["--threads", "2", "--durability", "log"])
        .args(["--metrics", "127.0.0.1:0"])
        .env("LIVELOCK_FAULT_LOG_FAIL_FILE", &fail);
    let mut server = ChildGuard::spawn("failing", &mut command, &dir);
    common::wait_listening(&mut server, addr);
    let metrics: SocketAddr = server.wait_for("the metrics address", |s| {
        let text = s.stderr();
        let at = text.find("metrics on http://")? + "metrics on http://".len();
        text[at..].split('/').next()?.parse().ok()
    });
    assert_eq!(http_status(metrics, "/health/ready"), 200);

    let holder = Client::connect(addr, &livelock::client::ClientOptions::default()).unwrap();
    holder.acquire("contended").unwrap().forget();
    let waiter = Arc::new(Client::connect(addr, &graceful()).unwrap());
    let pending = {
        let waiter = waiter.clone();
        std::thread::spawn(move || {
            let guard = waiter.acquire_timeout("contended", WAIT_MAX);
            guard.map(|g| g.map(|g| g.token()))
        })
    };
    wait_until("the waiter is queued", || {
        waiter
            .inspect("contended")
            .unwrap()
            .is_some_and(|r| r.waiters == 1)
    });

    // Asks on its own connection: the waiter's replies queue behind the
    // grant the log holds back.
    let probe = Client::connect(addr, &graceful()).unwrap();
    std::fs::write(&fail, b"").unwrap();
    // The holder goes (no grace): its release is a change the log cannot
    // take, so the waiter must not be told it has the lock; the failed
    // write puts the server in its refusing state.
    drop(holder);
    // (A change accepted before the failed write is seen would wait for
    // the disk like the release: probe only once the server says so.)
    wait_until("the failed write is reported", || {
        server.stderr().contains("writing the log failed")
    });
    assert!(matches!(
        probe.try_acquire("other"),
        Err(Error::Status(Status::StorageFailed, _))
    ));
    probe.ping().expect("PING answered");
    assert!(probe.stats().is_ok(), "reads answered");
    // An orchestrator sees it: alive, not ready.
    assert_eq!(http_status(metrics, "/health/live"), 200);
    assert_eq!(http_status(metrics, "/health/ready"), 503);
    let quiet_until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < quiet_until {
        assert!(
            !pending.is_finished(),
            "granted before the release was durable"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    std::fs::remove_file(&fail).unwrap();
    let granted = pending
        .join()
        .unwrap()
        .unwrap()
        .expect("granted once the disk is back");
    assert!(granted > 0);
    let other = probe
        .try_acquire("other")
        .unwrap()
        .expect("changes accepted again");
    drop((other, probe));
    wait_until("the recovery is logged", || {
        server.stderr().contains("writable again")
    });
    assert_eq!(http_status(metrics, "/health/ready"), 200);
    drop(waiter);
    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
}

/// The status code of `GET path` on the metrics endpoint.
fn http_status(addr: SocketAddr, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream.set_read_timeout(Some(WAIT_MAX)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

/// `count` lock names of 992 random hex digits (the log cannot compress them).
fn long_names(seed: u64, count: usize) -> Vec<String> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| (0..62).map(|_| format!("{:016x}", rng.next())).collect())
        .collect()
}

/// Takes every lock of `names`, 64 requests in flight; returns how many
/// were granted. `StorageFailed` refusals are counted out (a full disk).
fn take_all(client: &Client, names: &[String]) -> usize {
    let mut granted = 0;
    for window in names.chunks(64) {
        let pending: Vec<_> = window
            .iter()
            .map(|name| {
                client
                    .start_acquire(name, Default::default(), false)
                    .unwrap()
            })
            .collect();
        for acquire in pending {
            match acquire.wait() {
                Ok(guard) => {
                    guard.forget();
                    granted += 1;
                }
                Err(Error::Status(Status::StorageFailed, _)) => {}
                Err(e) => panic!("acquire failed: {e}"),
            }
        }
    }
    granted
}

/// Snapshots bound the log while the server serves: after one was taken
/// (and the log compacted), a crash restarts from it and the log after it.
#[test]
fn a_crash_after_a_snapshot_restarts_from_it_and_the_log_after() {
    let dir = ScratchDir::new("log-snapshot");
    let addr = free_addr();
    let data = data_dir(&dir);
    let extra = ["--snapshot-log-bytes", "1048576"];
    let mut server = start_server_with("first", &dir, &data, addr, "log", &extra);
    let client = Client::connect(addr, &graceful()).expect("connect");
    let (id, secret) = (client.session_id(), client.secret());
    assert_eq!(take_all(&client, &long_names(1, 1_500)), 1_500);
    wait_until("a snapshot is written", || {
        server.stderr().contains("snapshot of")
    });
    // Some more, in the log only (or in a later snapshot).
    assert_eq!(take_all(&client, &long_names(2, 300)), 300);
    server.kill();
    drop(client);

    let mut second = start_server_with("second", &dir, &data, addr, "log", &extra);
    assert!(second.stderr().contains("replayed"), "{}", second.stderr());
    let resumed = Client::resume(addr, id, secret, &graceful()).expect("resumes");
    assert_eq!(
        resumed.resumed().unwrap().holds.len(),
        1_800,
        "every hold is back"
    );
    drop(resumed);
    signal(&second, libc::SIGTERM);
    expect_clean_exit(&mut second);
}

/// A snapshot taken while the server is idle covers the whole log, which
/// is then compacted away entirely; the next change is still logged and
/// acknowledged (raft's in-memory log used to fall back to index 0 and
/// refuse it, stopping the log thread).
#[test]
fn changes_go_on_after_a_snapshot_of_the_whole_log() {
    let dir = ScratchDir::new("log-snapshot-idle");
    let addr = free_addr();
    let data = data_dir(&dir);
    let extra = ["--snapshot-log-bytes", "1048576", "--log-level", "debug"];
    let mut server = start_server_with("idle", &dir, &data, addr, "log", &extra);
    let client = Client::connect(addr, &graceful()).expect("connect");
    // ~0.9 MiB of log, then one change at a time until the snapshot is
    // asked for, so that nothing follows the entry it covers.
    assert_eq!(take_all(&client, &long_names(1, 900)), 900);
    let mut asked = false;
    for name in long_names(2, 400) {
        client.acquire(&name).unwrap().forget();
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(20) && !asked {
            asked = server.stderr().contains("snapshot asked at entry");
        }
        if asked {
            break;
        }
    }
    assert!(asked, "no snapshot within 1.3 MiB of log");
    // Idle: the log thread compacts everything the snapshot covers.
    wait_until("the log compacted", || {
        server.stderr().contains("log compacted up to entry")
    });
    // Changes are still acknowledged, each within the bound.
    for i in 0..5 {
        let name = format!("after-{i}");
        let granted = common::bounded("an acquire after the snapshot", {
            let client = Client::connect(addr, &graceful()).expect("connect");
            move || client.acquire(name).map(|g| g.token())
        });
        assert!(granted.is_ok(), "{granted:?}: {}", server.stderr());
    }
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
}

/// A real full disk, where the test may mount a small tmpfs (root with
/// CAP_SYS_ADMIN; elsewhere the injected fault above stands in): changes
/// are refused while the disk is full and accepted again once space is
/// freed, and what was acknowledged before is kept.
#[test]
fn a_full_disk_refuses_changes_until_space_is_freed() {
    let dir = ScratchDir::new("log-full");
    let mount_point = dir.join("small");
    std::fs::create_dir_all(&mount_point).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&mount_point)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("no tmpfs can be mounted here: the injected fault covers a full disk");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount_point.clone());
    let data = mount_point.join("data");
    let addr = free_addr();
    let mut server = start_server_with("full", &dir, &data, addr, "log", &[]);
    let client = Client::connect(addr, &graceful()).expect("connect");
    let (id, secret) = (client.session_id(), client.secret());
    client.acquire("before-full").unwrap().forget();
    let probe = Client::connect(addr, &graceful()).expect("connect");

    // Fill the disk to the last byte.
    let filler = mount_point.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let mut byte = [0u8; 1];
        while file.write_all(&byte).is_ok() {
            byte[0] = byte[0].wrapping_add(1);
        }
        let _ = file.sync_all();
    }
    // The log writes only with room to spare (raft-engine must never run
    // out in the middle of a write): the next change waits, those after it
    // are refused. Long, incompressible names make it a few MB of log.
    let names = long_names(0xf011, 3_000);
    let count = names.len();
    let waiting = std::thread::spawn(move || {
        let granted = take_all(&client, &names);
        (client, granted)
    });
    wait_until("the full disk is reported", || {
        server.stderr().contains("writing the log failed")
    });
    assert!(matches!(
        probe.try_acquire("refused"),
        Err(Error::Status(Status::StorageFailed, _))
    ));
    probe.ping().expect("PING answered while the disk is full");

    std::fs::remove_file(&filler).unwrap();
    let (client, granted) = waiting.join().unwrap();
    // The changes that waited went through; those that came after the
    // failure was noticed were refused.
    assert!(granted > 0 && granted <= count);
    let after = probe
        .try_acquire("after-full")
        .unwrap()
        .expect("accepted again");
    after.forget();
    drop((client, probe));

    // All three are durable: a crash keeps them.
    server.kill();
    let mut second = start_server_with("after", &dir, &data, addr, "log", &[]);
    let resumed = Client::resume(addr, id, secret, &graceful()).expect("resumes");
    let holds = resumed.resumed().unwrap().holds;
    assert_eq!(
        holds.len(),
        granted + 1,
        "every acknowledged hold of the session is back"
    );
    assert!(holds.iter().any(|h| h.name == b"before-full"));
    drop(resumed);
    signal(&second, libc::SIGTERM);
    expect_clean_exit(&mut second);
}

/// The state does not belong to a thread: a log written by a server with
/// two loops restarts whole on one loop and on three (sessions, holds and
/// their tokens), after a crash.
#[test]
fn a_crash_restart_with_another_loop_count_keeps_everything() {
    let dir = ScratchDir::new("log-threads");
    let addr = free_addr();
    let data = data_dir(&dir);
    let mut server = start_server_with("two loops", &dir, &data, addr, "log", &[]);
    let mut sessions = Vec::new();
    let mut expected = BTreeMap::new();
    for c in 0..6 {
        let client = Client::connect(addr, &graceful()).expect("connect");
        for i in 0..10 {
            let name = format!("c{c}-lock{i}");
            let guard = client.acquire(&name).unwrap();
            expected.insert(name, guard.token());
            guard.forget();
        }
        sessions.push((client.session_id(), client.secret()));
    }
    for threads in ["1", "3"] {
        server.kill();
        server = start_server_with(threads, &dir, &data, addr, "log", &["--threads", threads]);
        let mut found = BTreeMap::new();
        let mut clients = Vec::new();
        for &(id, secret) in &sessions {
            let client = Client::resume(addr, id, secret, &graceful()).expect("resumes");
            for hold in client.resumed().unwrap().holds {
                found.insert(String::from_utf8(hold.name).unwrap(), hold.token);
            }
            clients.push(client);
        }
        assert_eq!(
            found, expected,
            "{threads} loop(s): the holds and their tokens"
        );
    }
    signal(&server, libc::SIGTERM);
    expect_clean_exit(&mut server);
}

/// A data directory that cannot be used is an error at start, not at the
/// first change or at shutdown.
#[test]
fn an_unusable_data_dir_stops_the_start() {
    let dir = ScratchDir::new("log-bad-dir");
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let addr = free_addr();
    let mut command = livelock_bin();
    command
        .args(["server", "--listen", &addr.to_string(), "--data-dir"])
        .arg(not_a_dir.join("data"));
    let mut server = ChildGuard::spawn("bad dir", &mut command, &dir);
    let status = server.wait_exit();
    assert!(!status.success(), "started on an unusable data dir");
    assert!(
        server.stderr().contains("cannot start") && server.stderr().contains("file/data"),
        "{}",
        server.stderr()
    );
}

/// Damage before the log's tail (not a torn last write) stops the start
/// with a message, rather than drop what was acknowledged after it.
#[test]
fn damage_before_the_tail_stops_the_start() {
    let dir = ScratchDir::new("log-damaged");
    let addr = free_addr();
    let mut server = start("first", &dir, addr);
    let client = Client::connect(addr, &graceful()).expect("connect");
    for i in 0..200 {
        client.acquire(format!("damaged-{i}")).unwrap().forget();
    }
    // The log's high-water mark follows it once the log is idle.
    let mark = data_dir(&dir).join("livelock.logmark");
    wait_until("the log's mark follows it", || {
        std::fs::read_to_string(&mark).is_ok_and(|m| m.trim().parse::<u64>().unwrap_or(0) >= 150)
    });
    server.kill();
    drop(client);
    let log_dir = data_dir(&dir).join("log");
    let file = std::fs::read_dir(&log_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "raftlog"))
        .expect("a log file");
    let mut bytes = std::fs::read(&file).unwrap();
    // Somewhere in the first third of what was written: many acknowledged
    // writes come after it.
    let written = bytes.iter().rposition(|&b| b != 0).unwrap();
    for byte in &mut bytes[written / 3..written / 3 + 8] {
        *byte ^= 0x5a;
    }
    std::fs::write(&file, bytes).unwrap();

    let mut command = livelock_bin();
    command
        .args(["server", "--listen", &addr.to_string(), "--data-dir"])
        .arg(data_dir(&dir));
    let mut second = ChildGuard::spawn("damaged", &mut command, &dir);
    let status = second.wait_exit();
    assert!(!status.success(), "started without acknowledged history");
    // raft-engine finds the damaged record when it is read (its checksum),
    // or cuts the log there, which leaves it short of the commit index.
    assert!(
        second.stderr().contains("cannot start from the log"),
        "{}",
        second.stderr()
    );
}
