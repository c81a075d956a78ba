//! Counting semaphores over real sockets: the Rust client's `semaphore`
//! (weights, strict FIFO, kinds and capacities, SET_CAPACITY, INSPECT),
//! `livelock run --permits` (the permits in LIVELOCK_HELD, a `kill -9` of
//! the holder frees them at once), and permits across a crash of a
//! `--durability log` server (kill -9: holds, queue and capacity come back).

mod common;

use common::{
    bounded, data_dir, free_addr, graceful, livelock_bin, start_server_with, wait_until,
    ChildGuard, ScratchDir, TestServer, WAIT_MAX,
};
use livelock::client::{Client, ClientOptions, Error};
use livelock::protocol::{Mode, Status};

#[test]
fn permits_are_shared_out_in_fifo_order_by_weight() {
    let server = TestServer::start(2);
    let (a, b, c) = (server.client(), server.client(), server.client());
    let gpus_a = a.semaphore("gpus", 3);
    let two = gpus_a.acquire(2).unwrap();
    // B wants 2: only 1 is free, it queues.
    let gpus_b = b.semaphore("gpus", 3);
    let mut pending = b.start_acquire("gpus", gpus_b.options(2), true).unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap(), "no QUEUED reply");
    // C's 1 would fit, but B is ahead of it: strict FIFO.
    let gpus_c = c.semaphore("gpus", 3);
    assert!(gpus_c.try_acquire(1).unwrap().is_none());

    let seen = c.inspect("gpus").unwrap().expect("in use");
    assert_eq!((seen.mode, seen.capacity), (Mode::Permits, 3));
    assert_eq!(seen.holders.len(), 1);
    assert_eq!(seen.holders[0].weight, 2);
    assert_eq!(seen.holders[0].token, two.token());
    assert_eq!(seen.queue.len(), 1);
    assert_eq!(
        (seen.queue[0].mode, seen.queue[0].weight),
        (Mode::Permits, 2)
    );

    // A gives its 2 back: B gets 2 in the same step, C's 1 fits beside it.
    two.release().unwrap();
    let b_guard = bounded("B's grant", move || pending.wait()).unwrap();
    let c_guard = gpus_c.try_acquire(1).unwrap().expect("1 of 3 left");
    assert!(c_guard.token() > b_guard.token());

    // The name is a semaphore of 3 while in use.
    match a.semaphore("gpus", 4).try_acquire(1) {
        Err(Error::Status(Status::CapacityConflict, _)) => {}
        other => panic!(
            "expected CapacityConflict, got {:?}",
            other.map(|g| g.is_some())
        ),
    }
    match a.try_acquire("gpus") {
        Err(Error::Status(Status::WrongKind, _)) => {}
        other => panic!("expected WrongKind, got {:?}", other.map(|g| g.is_some())),
    }
    let _lock = a.acquire("plain").unwrap();
    match b.semaphore("plain", 2).try_acquire(1) {
        Err(Error::Status(Status::WrongKind, _)) => {}
        other => panic!("expected WrongKind, got {:?}", other.map(|g| g.is_some())),
    }

    // Raised to 5: A's 2 fit now (2 + 1 + 2 = 5).
    let mut gpus_a = a.semaphore("gpus", 3);
    gpus_a.set_capacity(5).unwrap();
    let more = gpus_a
        .try_acquire(2)
        .unwrap()
        .expect("fits the new capacity");
    assert_eq!(c.inspect("gpus").unwrap().unwrap().capacity, 5);
    // Not in use, or a lock: refused.
    let mut idle = a.semaphore("idle", 1);
    assert!(matches!(
        idle.set_capacity(2),
        Err(Error::Status(Status::NotHeld, _))
    ));
    let mut plain = a.semaphore("plain", 1);
    assert!(matches!(
        plain.set_capacity(2),
        Err(Error::Status(Status::WrongKind, _))
    ));
    drop((more, b_guard, c_guard));
    wait_until("the semaphore to be forgotten", || {
        c.inspect("gpus").unwrap().is_none()
    });
}

#[test]
fn a_session_that_ends_releases_its_permits_to_the_queue() {
    let server = TestServer::start(2);
    let holder = server.client();
    let _all = holder.semaphore("pool", 2).acquire(2).unwrap();
    let waiter = server.client();
    let mut pending = waiter
        .start_acquire("pool", waiter.semaphore("pool", 2).options(1), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());
    // The holder's connection goes (no grace): its permits go with it.
    drop(holder);
    let guard = bounded("the grant after the holder left", move || pending.wait()).unwrap();
    assert!(guard.token() > 0);
}

/// `livelock run --permits W/C NAME -- sh -c SCRIPT`.
fn run_permits(server: &TestServer, permits: &str, script: &str) -> std::process::Command {
    let mut command = livelock_bin();
    command
        .args(["run", "--server"])
        .arg(server.addr.to_string())
        .args(["--permits", permits, "licences", "--", "sh", "-c", script]);
    command
}

#[test]
fn kill_9_of_a_run_holding_permits_frees_them() {
    let server = TestServer::start(2);
    let dir = ScratchDir::new("permits-kill9");
    let held_file = dir.join("held");
    let script = format!(
        "printf '%s\\n' \"$LIVELOCK_HELD\" > {}; exec sleep 60",
        held_file.display()
    );
    let mut first = ChildGuard::spawn(
        "run-two-of-three",
        &mut run_permits(&server, "2/3", &script),
        &dir,
    );
    let held = first.wait_for("LIVELOCK_HELD", |_| {
        let text = std::fs::read_to_string(&held_file).ok()?;
        text.ends_with('\n').then_some(text)
    });
    // "SERVER permits HEXNAME": a nested run of it would be refused.
    assert_eq!(
        held.trim(),
        format!("{} permits {}", server.addr, "6c6963656e636573")
    );
    // One more fits beside the run's 2; then the semaphore is full.
    let client = server.client();
    let licences = client.semaphore("licences", 3);
    let one = licences.try_acquire(1).unwrap().expect("1 of 3 left");
    let waiter = server.client();
    let mut pending = waiter
        .start_acquire("licences", waiter.semaphore("licences", 3).options(2), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());

    first.kill();
    let guard = bounded("the grant after kill -9", move || pending.wait()).unwrap();
    assert!(guard.token() > one.token());

    // A usage error, said before connecting.
    let out = livelock_bin()
        .args(["run", "--permits", "4/3", "x", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("can never be had"));
}

#[test]
fn permits_survive_a_crash_of_a_log_server() {
    let dir = ScratchDir::new("permits-crash");
    let addr = free_addr();
    let data = data_dir(&dir);
    let start = || start_server_with("log server", &dir, &data, addr, "log", &[]);
    let mut server = start();
    let options: ClientOptions = graceful();
    let holder = Client::connect(addr, &options).unwrap();
    let (id, secret) = (holder.session_id(), holder.secret());
    let guard = holder.semaphore("disks", 4).acquire(3).unwrap();
    let token = guard.token();
    guard.forget();
    let waiter = Client::connect(addr, &options).unwrap();
    let mut pending = waiter
        .start_acquire("disks", waiter.semaphore("disks", 4).options(2), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());
    let waiter_id = (waiter.session_id(), waiter.secret());
    std::mem::forget(pending);

    server.kill();
    drop((holder, waiter));
    let _server = start();

    // The holder comes back holding its 3 of 4; the waiter still waits.
    let holder = Client::resume(addr, id, secret, &options).unwrap();
    let seen = holder.inspect("disks").unwrap().expect("restored");
    assert_eq!((seen.mode, seen.capacity), (Mode::Permits, 4));
    assert_eq!(seen.holders.len(), 1);
    assert_eq!((seen.holders[0].weight, seen.holders[0].token), (3, token));
    assert_eq!(seen.queue.len(), 1);
    assert_eq!(seen.queue[0].weight, 2);
    // The waiter resumes; the holder's release grants it.
    let waiter = Client::resume(addr, waiter_id.0, waiter_id.1, &options).unwrap();
    holder.release("disks").unwrap();
    wait_until("the queued permits to be granted", || {
        waiter
            .inspect("disks")
            .unwrap()
            .is_some_and(|r| r.holders.len() == 1 && r.holders[0].session == waiter_id.0)
    });
}
