//! Dump on shutdown and reload on start, through the native protocol: a
//! session with a grace period RESUMEs on the restarted server and still
//! holds its lock, fencing tokens keep increasing, a session that does not
//! come back loses its locks after the grace, and a graceless session's
//! locks are not kept at all.

mod common;

use std::time::Duration;

use common::*;
use livelock::client::{Client, ClientOptions};
use livelock::protocol;

fn start(dir: &ScratchDir) -> TestServer {
    start_on(dir, "127.0.0.1:0".parse().unwrap())
}

fn start_on(dir: &ScratchDir, listen: std::net::SocketAddr) -> TestServer {
    let data_dir = dir.path().to_path_buf();
    TestServer::start_with(2, move |config| {
        config.listen = listen;
        config.data_dir = data_dir;
        config.dump_save = true;
        config.dump_load = true;
        config.release_all_timeout = Duration::from_millis(300);
        // A clock at the epoch: tokens seeded from it start near 0, so only
        // the dump keeps them increasing across a restart.
        config.clock_start_unix_ms = Some(1);
    })
}

fn stop(mut server: TestServer) {
    let server = server.server.take().expect("running");
    server.shutdown();
    server.join().expect("clean exit, dump written");
}

#[test]
fn holds_survive_a_restart_for_sessions_that_come_back() {
    let dir = ScratchDir::new("restart");
    let first = start(&dir);
    let graceful = ClientOptions {
        grace: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let keeper = first.client_with(&graceful);
    let kept = keeper.acquire("kept").unwrap();
    let kept_token = kept.token();
    kept.forget();
    // A short grace: after the restart the session is kept for
    // max(its grace, release-all timeout + 1 s).
    let leaver = first.client_with(&ClientOptions {
        grace: Duration::from_secs(1),
        ..ClientOptions::default()
    });
    leaver.acquire("abandoned").unwrap().forget();
    let graceless = first.client();
    graceless.acquire("graceless").unwrap().forget();
    let (id, secret) = (keeper.session_id(), keeper.secret());
    stop(first);
    assert!(
        dir.path().join("livelock.dump").is_file(),
        "the dump is written"
    );

    let second = start(&dir);
    let resumed = Client::resume(second.addr, id, secret, &graceful).expect("resume after restart");
    let other = second.client();
    // The resumed session still holds its lock; a graceless one's is gone.
    assert!(
        other.try_acquire("kept").unwrap().is_none(),
        "kept is still held"
    );
    let graceless_lock = other
        .try_acquire("graceless")
        .unwrap()
        .expect("not restored");
    assert!(
        graceless_lock.token() > kept_token,
        "tokens keep increasing across the restart"
    );
    // The session that did not come back loses its lock after the grace
    // (release-all timeout + 1 s): a waiter gets it then.
    let abandoned = other
        .acquire_timeout("abandoned", WAIT_MAX)
        .unwrap()
        .expect("freed after the grace");
    assert!(abandoned.token() > kept_token);
    // The resumed session can release what it held before the restart.
    resumed.release("kept").unwrap();
    let kept_again = other.try_acquire("kept").unwrap().expect("released");
    assert!(kept_again.token() > graceless_lock.token());
}

#[test]
fn a_corrupt_dump_is_ignored() {
    let dir = ScratchDir::new("corrupt-dump");
    std::fs::write(
        dir.path().join("livelock.dump"),
        b"LLDUMP\0\x01 but then garbage",
    )
    .unwrap();
    let server = start(&dir);
    let client = server.client();
    assert!(
        client.try_acquire("anything").unwrap().is_some(),
        "starts empty and serves"
    );
    // Kept for the operator under another name, so no later dump replaces it.
    assert_eq!(
        std::fs::read(dir.join("livelock.dump.rejected")).unwrap(),
        b"LLDUMP\0\x01 but then garbage"
    );
    assert!(!dir.join("livelock.dump").exists());
}

#[test]
fn livelock_run_with_grace_keeps_its_lock_across_a_server_restart() {
    let dir = ScratchDir::new("run-restart");
    let first = start(&dir);
    let addr = first.addr;
    let started = dir.join("started");
    let finished = dir.join("finished");
    let go = dir.join("go");
    // The command runs until the test says go (bounded by the test's wait).
    let script = format!(
        "echo $LIVELOCK_FENCE > {}; i=0; while [ ! -e {} ] && [ $i -lt 400 ]; do sleep 0.05; \
         i=$((i+1)); done; echo done > {}",
        started.display(),
        go.display(),
        finished.display()
    );
    let mut run = ChildGuard::spawn(
        "run",
        std::process::Command::new(env!("CARGO_BIN_EXE_livelock"))
            .args([
                "run",
                "--server",
                &addr.to_string(),
                "--grace",
                "20s",
                "job",
            ])
            .args(["--", "sh", "-c", &script])
            .stdin(std::process::Stdio::null()),
        &dir,
    );
    wait_until("the command started under the lock", || started.is_file());
    stop(first);
    // Same port, same data dir: the session comes back detached and
    // `livelock run` RESUMEs it; the command is never stopped.
    let second = start_on(&dir, addr);
    let probe = second.client();
    assert!(
        probe.try_acquire("job").unwrap().is_none(),
        "job is still held"
    );
    // The command may end while `livelock run` is still reconnecting: it
    // releases through the resumed session all the same.
    std::fs::write(&go, b"").unwrap();
    let status = run.wait_exit();
    assert!(status.success(), "run failed: {}", run.stderr());
    assert!(finished.is_file(), "the command ran to its end");
    assert!(
        probe.try_acquire("job").unwrap().is_some(),
        "released at the end; run said: {}",
        run.stderr()
    );
}

/// A server that keeps its token mark in `dir`, with the wall clock
/// reading `clock_unix_ms` at start (None: the real clock).
fn start_keeping_tokens(dir: &ScratchDir, clock_unix_ms: Option<u64>) -> TestServer {
    let data_dir = dir.path().to_path_buf();
    TestServer::start_with(2, move |config| {
        config.data_dir = data_dir;
        config.keep_tokens = true;
        config.clock_start_unix_ms = clock_unix_ms;
    })
}

/// Safety issue, item 4: tokens come from the durable mark, not from the
/// wall clock. A crash (nothing dumped) followed by a start whose clock is a
/// day behind still hands out greater tokens.
#[test]
fn tokens_never_repeat_after_a_crash_even_when_the_clock_steps_back() {
    let dir = ScratchDir::new("tokens-clock");
    let first = start_keeping_tokens(&dir, None);
    let before = first.client().acquire("fenced").unwrap().token();
    stop(first); // no dump: as after a crash
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let second = start_keeping_tokens(&dir, Some(now_ms - 86_400_000));
    let after = second.client().acquire("fenced").unwrap().token();
    assert!(
        after > before,
        "token {after} after the restart is not above {before}"
    );
}

/// Safety issue, item 1: a dump is consumed once. A takes X; clean restart
/// (dump); A resumes and releases X; C takes X; the server dies without a
/// dump; at the next start X must not come back to A, nor A's session.
#[test]
fn a_crash_restart_does_not_resurrect_a_consumed_dump() {
    let dir = ScratchDir::new("consumed");
    let graceful = ClientOptions {
        grace: Duration::from_secs(30),
        ..ClientOptions::default()
    };
    let first = start(&dir);
    let a = first.client_with(&graceful);
    a.acquire("x").unwrap().forget();
    let (id, secret) = (a.session_id(), a.secret());
    stop(first);
    let data_dir = dir.path().to_path_buf();
    // The second server reads the dump but will "crash": it writes none.
    let second = TestServer::start_with(2, move |config| {
        config.data_dir = data_dir;
        config.dump_load = true;
        config.release_all_timeout = Duration::from_millis(300);
    });
    assert!(!dir.join("livelock.dump").exists(), "consumed at start");
    let a = Client::resume(second.addr, id, secret, &graceful).expect("resumes");
    a.release("x").unwrap();
    let c = second.client_with(&graceful);
    c.try_acquire("x").unwrap().expect("free").forget();
    stop(second);
    let third = start(&dir);
    let d = third.client();
    assert!(
        d.try_acquire("x").unwrap().is_some(),
        "no phantom hold of x"
    );
    let resumed = Client::resume(third.addr, id, secret, &graceful);
    assert!(resumed.is_err(), "A's session did not come back");
}

/// Safety issue, item 5: a leased hold keeps what was left of its lease
/// across a restart (without it, the hold would live for the session's
/// 60 s grace, past this test's wait).
#[test]
fn a_lease_survives_a_restart() {
    let dir = ScratchDir::new("lease-restart");
    let first = start(&dir);
    let holder = first.client_with(&ClientOptions {
        grace: Duration::from_secs(60),
        ..ClientOptions::default()
    });
    let options = livelock::client::AcquireOptions {
        lease: Some(Duration::from_secs(2)),
        ..livelock::client::AcquireOptions::default()
    };
    holder.acquire_with("leased", options).unwrap().forget();
    stop(first);
    let second = start(&dir);
    let other = second.client();
    assert!(other.try_acquire("leased").unwrap().is_none(), "still held");
    let got = other.acquire_timeout("leased", WAIT_MAX).unwrap();
    assert!(got.is_some(), "the lease ran out after the restart");
}

/// Safety issue, item 6: a queued acquire keeps its place across a restart
/// and gets exactly one final reply; RESUME reports the session's grace.
#[test]
fn a_queued_acquire_survives_a_restart_and_is_answered_once() {
    let dir = ScratchDir::new("queued-restart");
    let first = start(&dir);
    let holder = first.client_with(&ClientOptions {
        grace: Duration::from_secs(60),
        ..ClientOptions::default()
    });
    holder.acquire("q").unwrap().forget();
    let (mut waiter, id, secret) = RawConn::hello(first.addr, 60_000);
    let acquire = protocol::Request::Acquire {
        name: b"q",
        mode: protocol::Mode::Exclusive,
        weight: 1,
        capacity: 0,
        wait_ms: protocol::WAIT_FOREVER,
        lease_ms: 0,
        notify_queued: true,
    };
    waiter.send(7, &acquire);
    assert_eq!(waiter.recv().status, protocol::Status::Queued);
    let (holder_id, holder_secret) = (holder.session_id(), holder.secret());
    stop(first);
    let second = start(&dir);
    let mut waiter = RawConn::connect(second.addr);
    let resume = protocol::Request::Resume {
        session_id: id,
        secret,
        password: b"",
    };
    let reply = waiter.call(2, &resume);
    assert_eq!(reply.status, protocol::Status::Ok, "{reply:?}");
    let (_, _, grace_ms) = protocol::parse_session_body(&reply.body).unwrap();
    assert_eq!(grace_ms, 60_000, "the session's own grace is in force");
    assert_eq!(
        protocol::parse_resumed_in_flight(&reply.body),
        Some(vec![7]),
        "the queued acquire is still in flight"
    );
    assert_eq!(
        waiter.recv().opcode,
        protocol::opcode::HELD_END,
        "holds nothing"
    );
    // Still in flight: a second use of id 7 is refused.
    let dup = waiter.call(
        7,
        &protocol::Request::Release {
            name: b"q",
            token: 0,
        },
    );
    assert_eq!(dup.status, protocol::Status::DuplicateRequestId);
    let holder = Client::resume(
        second.addr,
        holder_id,
        holder_secret,
        &ClientOptions::default(),
    )
    .unwrap();
    holder.release("q").unwrap();
    let grant = waiter.recv();
    assert_eq!(
        (grant.request_id, grant.status),
        (7, protocol::Status::Ok),
        "{grant:?}"
    );
    waiter.expect_silence(Duration::from_millis(200));
}

#[test]
fn tokens_keep_increasing_across_a_restart_without_a_dump() {
    // As after a crash: nothing is written, nothing is read; the durable
    // token mark alone keeps them increasing.
    let dir = ScratchDir::new("tokens-no-dump");
    let first = start_keeping_tokens(&dir, None);
    let before = first.client().acquire("fenced").unwrap().token();
    stop(first);
    let second = start_keeping_tokens(&dir, None);
    let after = second.client().acquire("fenced").unwrap().token();
    assert!(
        after > before,
        "token {after} after the restart is not above {before}"
    );
}

/// A server without a durable mark (an embedder's, `keep_tokens` off, no
/// dump) still starts its tokens above an earlier run's, from the wall
/// clock (found in review: they restarted at 1).
#[test]
fn an_in_memory_server_starts_its_tokens_from_the_clock() {
    let first = TestServer::start(1);
    let before = first.client().acquire("fenced").unwrap().token();
    stop(first);
    let second = TestServer::start(1);
    let after = second.client().acquire("fenced").unwrap().token();
    assert!(
        after > before,
        "token {after} after the restart, {before} before"
    );
}
