//! Deadlock detection over real sockets: sessions that take locks one at a
//! time in opposite orders (across shards) deadlock; the server fails the
//! youngest wait of the cycle with `Deadlock`, naming the cycle, and the
//! others proceed. Long waits, chains and waits that time out are never
//! reported. Every wait here is bounded (WAIT_MAX); the time from the
//! cycle closing to the failure is printed, not asserted.

mod common;

use std::time::{Duration, Instant};

use common::{bounded, TestServer, WAIT_MAX};
use livelock::client::{AcquireOptions, Client, Error, PendingAcquire};
use livelock::protocol::Status;

/// Starts an acquire of `name` that waits (at most WAIT_MAX) and returns
/// once the server said it is queued. It starts 2 ms after the call: the
/// server keeps queueing times in ms, and "youngest" is by queueing time,
/// so waits queued one after the other here are never of the same ms.
fn queued(client: &Client, name: &str) -> PendingAcquire {
    std::thread::sleep(Duration::from_millis(2));
    let options = AcquireOptions {
        wait: Some(WAIT_MAX),
        ..AcquireOptions::default()
    };
    let mut pending = client.start_acquire(name, options, true).unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap(), "not queued: {name}");
    pending
}

#[test]
fn a_cycle_across_shards_fails_its_youngest_wait() {
    let server = TestServer::start(4);
    let (a, b) = (server.client(), server.client());
    let x = a.acquire("x").unwrap();
    let y = b.acquire("y").unwrap();
    let a_waits = queued(&a, "y");
    // B's wait closes the cycle: it is the youngest.
    let closed = Instant::now();
    let b_waits = queued(&b, "x");
    let failure = bounded("the deadlock reply", move || b_waits.wait().err());
    let elapsed = closed.elapsed();
    let message = match failure {
        Some(Error::Status(Status::Deadlock, message)) => message,
        other => panic!("expected Deadlock, got {other:?}"),
    };
    println!("cycle of 2 failed {elapsed:?} after it closed: {message}");
    assert!(
        message.contains("\"x\"") && message.contains("\"y\""),
        "{message}"
    );
    assert!(
        message.contains(&format!("{:#x}", a.session_id()))
            && message.contains(&format!("{:#x}", b.session_id())),
        "{message}"
    );
    // A still waits for y; B lets go of it and A proceeds.
    drop(y);
    let y = bounded("A's grant", move || a_waits.wait()).unwrap();
    drop((x, y));
    let stats = a.stats().unwrap();
    assert_eq!(stats.locks, 0, "{stats:?}");
}

#[test]
fn a_cycle_of_three_loses_one_wait_only() {
    let server = TestServer::start(4);
    let clients: Vec<Client> = (0..3).map(|_| server.client()).collect();
    let names = ["p", "q", "r"];
    let held: Vec<_> = clients
        .iter()
        .zip(names)
        .map(|(c, n)| c.acquire(n).unwrap())
        .collect();
    // 0 waits for q (1's), 1 for r (2's), 2 for p (0's): a cycle.
    let mut waits: Vec<PendingAcquire> = (0..3)
        .map(|i| queued(&clients[i], names[(i + 1) % 3]))
        .collect();
    let youngest = waits.pop().unwrap();
    match bounded("the deadlock reply", move || youngest.wait().err()) {
        Some(Error::Status(Status::Deadlock, _)) => {}
        other => panic!("expected Deadlock, got {other:?}"),
    }
    // Client 2 gives r back: 1 gets it, then 0 gets q once 1 is done.
    let mut held = held.into_iter();
    let (p, q, r) = (held.next(), held.next(), held.next());
    drop(r);
    let second = waits.pop().unwrap();
    let r = bounded("1's grant", move || second.wait()).unwrap();
    drop((q, r));
    let first = waits.pop().unwrap();
    let q = bounded("0's grant", move || first.wait()).unwrap();
    drop((p, q));
}

#[test]
fn long_waits_and_chains_are_not_deadlocks() {
    let server = TestServer::start(2);
    let (a, b, c) = (server.client(), server.client(), server.client());
    // A chain: C waits for B, B waits for A; nothing waits for C.
    let m = a.acquire("m").unwrap();
    let n = b.acquire("n").unwrap();
    let b_waits = queued(&b, "m");
    let c_waits = queued(&c, "n");
    // Long enough for many detection rounds (20 ms each).
    let options = AcquireOptions {
        wait: Some(Duration::from_millis(400)),
        ..AcquireOptions::default()
    };
    match c.acquire_with("m", options) {
        Err(Error::Status(Status::TimedOut, _)) => {}
        other => panic!("expected TimedOut, got {:?}", other.map(|g| g.token())),
    }
    drop(m);
    let m = bounded("B's grant", move || b_waits.wait()).unwrap();
    drop(n);
    drop(m);
    let n = bounded("C's grant", move || c_waits.wait()).unwrap();
    drop(n);
    assert_eq!(a.stats().unwrap().waiters, 0);
}
