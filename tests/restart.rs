//! Dump on shutdown and reload on start, through the native protocol: a
//! session with a grace period RESUMEs on the restarted server and still
//! holds its lock, fencing tokens keep increasing, a session that does not
//! come back loses its locks after the grace, and a graceless session's
//! locks are not kept at all.

mod common;

use std::time::Duration;

use common::*;
use livelock::client::{Client, ClientOptions};

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
    let leaver = first.client_with(&graceful);
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
}

#[test]
fn livelock_run_with_grace_keeps_its_lock_across_a_server_restart() {
    let dir = ScratchDir::new("run-restart");
    let first = start(&dir);
    let addr = first.addr;
    let started = dir.join("started");
    let finished = dir.join("finished");
    let script = format!(
        "echo $LIVELOCK_FENCE > {}; sleep 3; echo done > {}",
        started.display(),
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
    let status = run.wait_exit();
    assert!(status.success(), "run failed: {}", run.stderr());
    assert!(finished.is_file(), "the command ran to its end");
    assert!(
        probe.try_acquire("job").unwrap().is_some(),
        "released at the end"
    );
}

#[test]
fn tokens_keep_increasing_across_a_restart_without_a_dump() {
    // As after a crash: nothing is written, nothing is read.
    let first = TestServer::start(2);
    let before = first.client().acquire("fenced").unwrap().token();
    stop(first);
    let second = TestServer::start(2);
    let after = second.client().acquire("fenced").unwrap().token();
    assert!(
        after > before,
        "token {after} after the restart is not above {before}"
    );
}
