//! End-to-end semantics of a running server, through `livelock::client` (and
//! raw frames where exact bytes matter): mutual exclusion and fencing across
//! shards, shared locks, FIFO queues, wait timeouts, cancel, leases, locks
//! freed by a closed connection, grace periods and RESUME (also across
//! loops), passwords, pipelining, duplicate request ids, BYE and shutdown.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use livelock::client::{
    AcquireOptions, Client, ClientOptions, Error, Event, Guard, PendingAcquire,
};
use livelock::lock_table::shard_for;
use livelock::protocol::{self, flags, opcode, Mode, Request, Status, WAIT_FOREVER};
use livelock::session::home_of;

use common::*;

/// Tests that measure time take this, so that the heavy stress test of this
/// binary does not run beside them.
static TIMING: Mutex<()> = Mutex::new(());

fn timing() -> MutexGuard<'static, ()> {
    TIMING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `mode`, waiting at most WAIT_MAX (so that the server ends every wait too).
fn opts(mode: Mode) -> AcquireOptions {
    AcquireOptions {
        mode,
        wait: Some(WAIT_MAX),
        lease: None,
        ..AcquireOptions::default()
    }
}

/// Who got an answer, when, and what it was.
type Answer = (&'static str, Instant, livelock::client::Result<Guard>);

/// Waits for `pending` on its own thread; the answer arrives on `tx`.
fn spawn_wait(label: &'static str, pending: PendingAcquire, tx: &Sender<Answer>) {
    let tx = tx.clone();
    std::thread::spawn(move || {
        let result = pending.wait();
        let _ = tx.send((label, Instant::now(), result));
    });
}

/// The next answer, which must be a grant.
fn next_grant(rx: &Receiver<Answer>) -> (&'static str, Instant, Guard) {
    match rx.recv_timeout(WAIT_MAX) {
        Ok((label, at, Ok(guard))) => (label, at, guard),
        Ok((label, _, Err(e))) => panic!("{label}: expected a grant, got {e}"),
        Err(_) => panic!("no grant within {WAIT_MAX:?}"),
    }
}

/// Sends an acquire with `notify_queued` and waits until the server says it
/// is queued (so that the next one queues behind it).
fn queue(client: &Client, name: &str, mode: Mode) -> PendingAcquire {
    let mut pending = client.start_acquire(name, opts(mode), true).unwrap();
    assert!(
        pending.wait_queued(WAIT_MAX).unwrap(),
        "no QUEUED for {name}"
    );
    pending
}

/// No grant has been delivered to any of `waiters`: a PING through each of
/// their connections comes back first. (A grant decided before the PING
/// reaches the waiter's home loop is written before the PING's reply.)
fn assert_no_grant(rx: &Receiver<Answer>, waiters: &[&Client]) {
    for client in waiters {
        client.ping().unwrap();
    }
    if let Ok((label, _, result)) = rx.try_recv() {
        panic!(
            "{label} answered too early: {:?}",
            result.map(|g| g.token())
        );
    }
}

/// `per_shard` lock names owned by each of `shards` shards.
fn names_on_every_shard(prefix: &str, shards: usize, per_shard: usize) -> Vec<String> {
    let mut count = vec![0; shards];
    let mut names = Vec::new();
    for i in 0.. {
        let name = format!("{prefix}-{i}");
        let shard = shard_for(name.as_bytes(), shards);
        if count[shard] < per_shard {
            count[shard] += 1;
            names.push(name);
        }
        if names.len() == shards * per_shard {
            break;
        }
    }
    names
}

fn acquire_req(name: &[u8], wait_ms: u32, notify_queued: bool) -> Request<'_> {
    Request::Acquire {
        name,
        mode: Mode::Exclusive,
        weight: 1,
        capacity: 0,
        wait_ms,
        lease_ms: 0,
        notify_queued,
    }
}

fn token_of(frame: &RawFrame) -> u64 {
    protocol::parse_token_body(&frame.body).expect("a grant carries a token")
}

/// What one lock saw while the stress test ran.
#[derive(Default)]
struct LockState {
    writer: AtomicBool,
    readers: AtomicUsize,
    /// Largest token granted so far (recorded inside the critical section).
    max_token: AtomicU64,
    /// Token of the last exclusive grant.
    last_writer_token: AtomicU64,
}

#[test]
fn mutual_exclusion_and_fencing_under_many_clients_across_shards() {
    const THREADS: usize = 32;
    const CYCLES: usize = 40;
    let _timing = timing();
    let server = TestServer::start(4);
    let names = names_on_every_shard("mutex", 4, 2);
    let states: Vec<LockState> = names.iter().map(|_| LockState::default()).collect();
    let done = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (server, names, states, done) = (&server, &names, &states, &done);
            scope.spawn(move || {
                let client = server.client();
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (thread as u64 + 1);
                for _ in 0..CYCLES {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let k = (rng % names.len() as u64) as usize;
                    let (name, state) = (&names[k], &states[k]);
                    let shared = rng % 4 == 0;
                    let mode = if shared {
                        Mode::Shared
                    } else {
                        Mode::Exclusive
                    };
                    let guard = client.acquire_with(name, opts(mode)).unwrap();
                    let token = guard.token();
                    if shared {
                        state.readers.fetch_add(1, SeqCst);
                        assert!(!state.writer.load(SeqCst), "{name}: reader beside a writer");
                        let last_writer = state.last_writer_token.load(SeqCst);
                        assert!(
                            token > last_writer,
                            "{name}: reader token {token} <= writer's {last_writer}"
                        );
                        state.max_token.fetch_max(token, SeqCst);
                        std::thread::yield_now();
                        assert!(!state.writer.load(SeqCst), "{name}: writer beside a reader");
                        state.readers.fetch_sub(1, SeqCst);
                    } else {
                        assert!(!state.writer.swap(true, SeqCst), "{name}: two writers");
                        assert_eq!(
                            state.readers.load(SeqCst),
                            0,
                            "{name}: writer beside readers"
                        );
                        let before = state.max_token.fetch_max(token, SeqCst);
                        assert!(token > before, "{name}: token {token} after {before}");
                        state.last_writer_token.store(token, SeqCst);
                        std::thread::yield_now();
                        assert_eq!(
                            state.readers.load(SeqCst),
                            0,
                            "{name}: readers beside a writer"
                        );
                        state.writer.store(false, SeqCst);
                    }
                    guard.release().unwrap();
                    done.fetch_add(1, SeqCst);
                }
            });
        }
    });
    assert_eq!(done.load(SeqCst), THREADS * CYCLES);
    // Every lock is free again.
    let client = server.client();
    for name in &names {
        assert!(
            client.try_acquire(name).unwrap().is_some(),
            "{name} still held"
        );
    }
}

#[test]
fn shared_locks_admit_many_readers_and_exclude_writers() {
    let server = TestServer::start(2);
    let readers: Vec<Client> = (0..4).map(|_| server.client()).collect();
    let guards: Vec<Guard> = readers
        .iter()
        .map(|r| r.acquire_with("shared", opts(Mode::Shared)).unwrap())
        .collect();
    let max_reader_token = guards.iter().map(Guard::token).max().unwrap();

    let writer = server.client();
    assert!(
        writer.try_acquire("shared").unwrap().is_none(),
        "a writer got in beside readers"
    );
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_wait("writer", queue(&writer, "shared", Mode::Exclusive), &tx);
    // A reader that comes after a queued writer waits behind it, although
    // the lock is held in shared mode: the writer is not starved.
    let late = server.client();
    spawn_wait("late reader", queue(&late, "shared", Mode::Shared), &tx);

    let mut guards = guards.into_iter();
    let last = guards.next_back().unwrap();
    for guard in guards {
        guard.release().unwrap();
        assert_no_grant(&rx, &[&writer, &late]);
    }
    last.release().unwrap();
    let (label, _, write_guard) = next_grant(&rx);
    assert_eq!(label, "writer");
    assert!(write_guard.token() > max_reader_token);
    let try_shared = AcquireOptions {
        mode: Mode::Shared,
        wait: Some(Duration::ZERO),
        lease: None,
        ..AcquireOptions::default()
    };
    match readers[0].acquire_with("shared", try_shared) {
        Err(Error::Status(Status::Busy, _)) => {}
        other => panic!(
            "a reader got in beside a writer: {:?}",
            other.map(|g| g.token())
        ),
    }
    assert_no_grant(&rx, &[&late]);
    write_guard.release().unwrap();
    let (label, _, late_guard) = next_grant(&rx);
    assert_eq!(label, "late reader");
    assert!(late_guard.token() > max_reader_token);
}

#[test]
fn waiters_are_granted_in_fifo_order() {
    let server = TestServer::start(2);
    let a = server.client();
    let held = a.acquire_with("fifo", opts(Mode::Exclusive)).unwrap();
    let (b, c, d) = (server.client(), server.client(), server.client());
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_wait("B", queue(&b, "fifo", Mode::Exclusive), &tx);
    spawn_wait("C", queue(&c, "fifo", Mode::Exclusive), &tx);
    spawn_wait("D", queue(&d, "fifo", Mode::Exclusive), &tx);
    assert_no_grant(&rx, &[&b, &c, &d]);

    let mut last_token = held.token();
    held.release().unwrap();
    for (expected, rest) in [("B", vec![&c, &d]), ("C", vec![&d]), ("D", vec![])] {
        let (label, _, guard) = next_grant(&rx);
        assert_eq!(label, expected, "grant order");
        assert!(guard.token() > last_token, "tokens follow the grant order");
        last_token = guard.token();
        assert_no_grant(&rx, &rest);
        guard.release().unwrap();
    }
}

#[test]
fn fifo_mixes_shared_and_exclusive_waiters() {
    let server = TestServer::start(2);
    let a = server.client();
    let held = a.acquire_with("mix", opts(Mode::Exclusive)).unwrap();
    let clients: Vec<Client> = (0..4).map(|_| server.client()).collect();
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_wait("R1", queue(&clients[0], "mix", Mode::Shared), &tx);
    spawn_wait("R2", queue(&clients[1], "mix", Mode::Shared), &tx);
    spawn_wait("W", queue(&clients[2], "mix", Mode::Exclusive), &tx);
    spawn_wait("R3", queue(&clients[3], "mix", Mode::Shared), &tx);

    // The readers at the head are granted together; W and R3 (behind W) wait.
    held.release().unwrap();
    let first = next_grant(&rx);
    let second = next_grant(&rx);
    let mut labels = [first.0, second.0];
    labels.sort();
    assert_eq!(labels, ["R1", "R2"]);
    assert_no_grant(&rx, &[&clients[2], &clients[3]]);
    let readers_max = first.2.token().max(second.2.token());

    first.2.release().unwrap();
    assert_no_grant(&rx, &[&clients[2], &clients[3]]);
    second.2.release().unwrap();
    let (label, _, w) = next_grant(&rx);
    assert_eq!(label, "W");
    assert!(w.token() > readers_max);
    assert_no_grant(&rx, &[&clients[3]]);
    let w_token = w.token();
    w.release().unwrap();
    let (label, _, r3) = next_grant(&rx);
    assert_eq!(label, "R3");
    assert!(r3.token() > w_token);
}

#[test]
fn acquire_timeout_gives_up_and_the_lock_goes_to_the_next_waiter() {
    let server = TestServer::start(2);
    let a = server.client();
    let held = a.acquire_with("timeout", opts(Mode::Exclusive)).unwrap();

    let b = server.client();
    let start = Instant::now();
    assert!(b
        .acquire_timeout("timeout", Duration::from_millis(200))
        .unwrap()
        .is_none());
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "gave up after {waited:?}, not ~200 ms"
    );

    // B queues with a short wait, C behind it without one; B gives up, and
    // the lock later goes to C.
    let short = AcquireOptions {
        wait: Some(Duration::from_millis(300)),
        ..opts(Mode::Exclusive)
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let start = Instant::now();
    let mut pending = b.start_acquire("timeout", short, true).unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());
    spawn_wait("B", pending, &tx);
    let c = server.client();
    spawn_wait("C", queue(&c, "timeout", Mode::Exclusive), &tx);
    match rx.recv_timeout(WAIT_MAX).expect("B's answer") {
        ("B", at, Err(Error::Status(Status::TimedOut, _))) => {
            let waited = at - start;
            assert!(
                waited >= Duration::from_millis(250),
                "B gave up after {waited:?}"
            );
        }
        (label, _, result) => panic!("{label}: {:?}", result.map(|g| g.token())),
    }
    assert!(
        server.client().try_acquire("timeout").unwrap().is_none(),
        "A still holds it"
    );
    let a_token = held.token();
    held.release().unwrap();
    let (label, _, guard) = next_grant(&rx);
    assert_eq!(label, "C");
    assert!(guard.token() > a_token);
    assert!(b.release("timeout").is_err(), "B never got it");
}

#[test]
fn cancel_withdraws_a_queued_acquire() {
    let server = TestServer::start(2);
    let a = server.client();
    let held = a.acquire_with("cancel", opts(Mode::Exclusive)).unwrap();
    let (b, c) = (server.client(), server.client());
    let pending = queue(&b, "cancel", Mode::Exclusive);
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_wait("C", queue(&c, "cancel", Mode::Exclusive), &tx);

    pending.cancel().unwrap();
    // The Cancelled answer is sent before the CANCEL's own reply.
    match pending.wait() {
        Err(Error::Status(Status::Cancelled, _)) => {}
        other => panic!("expected Cancelled, got {:?}", other.map(|g| g.token())),
    }
    held.release().unwrap();
    let (label, _, guard) = next_grant(&rx);
    assert_eq!(label, "C", "the cancelled waiter was skipped");
    assert!(matches!(
        b.release("cancel"),
        Err(Error::Status(Status::NotHeld, _))
    ));
    drop(guard);

    // Cancelling an acquire that was already granted: NoSuchRequest, and the
    // grant stands.
    let mut granted = b
        .start_acquire("cancel-2", opts(Mode::Exclusive), true)
        .unwrap();
    assert!(granted.wait_queued(WAIT_MAX).unwrap());
    assert!(matches!(
        granted.cancel(),
        Err(Error::Status(Status::NoSuchRequest, _))
    ));
    let guard = granted.wait().unwrap();
    assert!(c.try_acquire("cancel-2").unwrap().is_none());
    guard.release().unwrap();
}

#[test]
fn lease_expiry_pushes_lock_lost_and_frees_the_lock() {
    let server = TestServer::start(2);
    let a = server.client();
    let leased = AcquireOptions {
        lease: Some(Duration::from_millis(300)),
        ..opts(Mode::Exclusive)
    };
    let start = Instant::now();
    let guard = a.acquire_with("lease", leased).unwrap();
    let token = guard.token();
    guard.forget();
    let w = server.client();
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_wait("W", queue(&w, "lease", Mode::Exclusive), &tx);

    match a.events().recv_timeout(WAIT_MAX) {
        Ok(Event::LockLost { name, token: lost }) => {
            assert_eq!(name, b"lease");
            assert_eq!(lost, token);
        }
        other => panic!("expected LockLost, got {other:?}"),
    }
    let lived = start.elapsed();
    assert!(
        lived >= Duration::from_millis(250),
        "lease ended after {lived:?}"
    );
    let (_, _, guard) = next_grant(&rx);
    assert!(guard.token() > token);
    assert!(matches!(
        a.release("lease"),
        Err(Error::Status(Status::NotHeld, _))
    ));
}

#[test]
fn extend_keeps_a_leased_lock() {
    let _timing = timing();
    let server = TestServer::start(2);
    let a = server.client();
    let lease = Duration::from_millis(1000);
    let leased = AcquireOptions {
        lease: Some(lease),
        ..opts(Mode::Exclusive)
    };
    let guard = a.acquire_with("extend", leased).unwrap();
    let other = server.client();
    // Extend every 100 ms for 1.5 leases: the hold never lapses.
    for _ in 0..15 {
        match a.events().recv_timeout(Duration::from_millis(100)) {
            Err(RecvTimeoutError::Timeout) => {}
            other => panic!("unexpected event while extending: {other:?}"),
        }
        guard.extend(lease).unwrap();
    }
    assert!(other.try_acquire("extend").unwrap().is_none());
    // Once it is no longer extended, it lapses.
    match a.events().recv_timeout(WAIT_MAX) {
        Ok(Event::LockLost { name, token }) => {
            assert_eq!(name, b"extend");
            assert_eq!(token, guard.token());
        }
        other => panic!("expected LockLost, got {other:?}"),
    }
    assert!(other.try_acquire("extend").unwrap().is_some());
    assert!(matches!(
        guard.extend(lease),
        Err(Error::Status(Status::NotHeld, _))
    ));
    guard.forget();
}

/// A closed connection's locks go to the next waiter at once, on the FIN,
/// not after the seconds keepalive would take to find a dead peer. Waits on
/// the grant itself; the bound only tells "at once" from "keepalive" (5 s)
/// with room for a loaded machine.
#[test]
fn a_closed_connection_frees_its_locks_for_the_next_waiter_at_once() {
    let server = TestServer::start(2);
    let a = server.client();
    a.acquire_with("closed", opts(Mode::Exclusive))
        .unwrap()
        .forget();
    let b = server.client();
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_wait("B", queue(&b, "closed", Mode::Exclusive), &tx);
    let start = Instant::now();
    drop(a);
    let (_, at, _guard) = next_grant(&rx);
    let took = at - start;
    assert!(
        took < Duration::from_secs(2),
        "close to grant took {took:?}: not on the FIN"
    );
}

#[test]
fn resume_within_grace_keeps_holds_queue_places_and_parked_grants() {
    let server = TestServer::start(2);
    let x = server.client();
    let x_guard = x.acquire_with("rg-b", opts(Mode::Exclusive)).unwrap();

    let (mut a, id, secret) = RawConn::hello(server.addr, 10_000);
    let reply = a.call(2, &acquire_req(b"rg-a", 0, false));
    assert_eq!(reply.status, Status::Ok);
    let a_token = token_of(&reply);
    a.send(3, &acquire_req(b"rg-b", WAIT_FOREVER, true));
    let queued = a.recv();
    assert_eq!((queued.request_id, queued.status), (3, Status::Queued));
    assert_eq!(queued.flags, flags::REPLY | flags::INTERIM);
    let c = server.client();
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_wait("C", queue(&c, "rg-b", Mode::Exclusive), &tx);

    // Close (a half-close would keep the connection: request 3 is owed a
    // reply) and wait for the session to be detached.
    drop(a);
    let other = server.client();
    wait_until("A detached", || {
        other.stats().unwrap().sessions_detached == 1
    });

    // Detached: its hold stays, and its place in the queue ahead of C too.
    assert!(
        other.try_acquire("rg-a").unwrap().is_none(),
        "hold lost while detached"
    );
    x_guard.release().unwrap();
    assert_no_grant(&rx, &[&c]);
    assert!(
        other.try_acquire("rg-b").unwrap().is_none(),
        "the detached session got rg-b"
    );

    // RESUME: the grant made while detached follows the session reply.
    let mut a2 = RawConn::connect(server.addr);
    let resume = Request::Resume {
        session_id: id,
        secret,
        password: b"",
    };
    let reply = a2.call(1, &resume);
    assert_eq!(reply.status, Status::Ok);
    let (resumed_id, resumed_secret, grace_ms) = protocol::parse_session_body(&reply.body).unwrap();
    assert_eq!((resumed_id, resumed_secret, grace_ms), (id, secret, 10_000));
    assert_eq!(
        protocol::parse_resumed_in_flight(&reply.body),
        Some(vec![]),
        "request 3 was answered while detached"
    );
    let grant = a2.recv();
    assert_eq!(
        (grant.opcode, grant.request_id, grant.status),
        (opcode::ACQUIRE, 3, Status::Ok)
    );
    // Then the listing of what the session holds, by name.
    let held: Vec<(u8, Vec<u8>)> = (0..3)
        .map(|_| a2.recv())
        .map(|f| (f.opcode, f.body.get(9..).unwrap_or_default().to_vec()))
        .collect();
    assert_eq!(
        held,
        [
            (opcode::HELD, b"rg-a".to_vec()),
            (opcode::HELD, b"rg-b".to_vec()),
            (opcode::HELD_END, Vec::new())
        ]
    );
    assert_eq!(grant.flags, flags::REPLY | flags::PUSH);
    let b_token = token_of(&grant);

    assert_eq!(
        a2.call(
            4,
            &Request::Release {
                name: b"rg-b",
                token: 0
            }
        )
        .status,
        Status::Ok
    );
    let (label, _, c_guard) = next_grant(&rx);
    assert_eq!(label, "C");
    assert!(c_guard.token() > b_token);
    assert_eq!(
        a2.call(
            5,
            &Request::Release {
                name: b"rg-a",
                token: 0
            }
        )
        .status,
        Status::Ok
    );
    let after = other
        .try_acquire("rg-a")
        .unwrap()
        .expect("released after RESUME");
    assert!(after.token() > a_token);
    assert_eq!(a2.call(6, &Request::Bye).status, Status::Ok);
    assert_eq!(a2.expect_closed(), vec![]);
}

#[test]
fn after_the_grace_period_the_holds_go_to_the_waiters() {
    let server = TestServer::start(2);
    let grace = Duration::from_millis(300);
    let a = server.client_with(&ClientOptions {
        grace,
        ..ClientOptions::default()
    });
    assert_eq!(a.grace(), grace);
    a.acquire_with("grace", opts(Mode::Exclusive))
        .unwrap()
        .forget();
    let b = server.client();
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_wait("B", queue(&b, "grace", Mode::Exclusive), &tx);
    let (id, secret) = (a.session_id(), a.secret());
    let start = Instant::now();
    drop(a);
    let (_, at, _guard) = next_grant(&rx);
    let held_for = at - start;
    assert!(
        held_for >= Duration::from_millis(250),
        "released {held_for:?} after the close"
    );
    match Client::resume(server.addr, id, secret, &ClientOptions::default()) {
        Err(Error::Status(Status::UnknownSession, _)) => {}
        other => panic!(
            "resumed an expired session: {:?}",
            other.map(|c| c.session_id())
        ),
    }
}

#[test]
fn resume_with_a_wrong_secret_fails_and_a_right_one_takes_over() {
    let server = TestServer::start(2);
    let options = ClientOptions {
        grace: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let a = server.client_with(&options);
    a.acquire_with("secret", opts(Mode::Exclusive))
        .unwrap()
        .forget();
    let mut wrong = a.secret();
    wrong[0] ^= 1;
    for (id, secret) in [
        (a.session_id(), wrong),
        (a.session_id() + (1 << 8), a.secret()), // same home loop, no such session
        (a.session_id() | 0xff, a.secret()),     // no such home loop
    ] {
        match Client::resume(server.addr, id, secret, &options) {
            Err(Error::Status(Status::UnknownSession, _)) => {}
            other => panic!("RESUME {id:#x}: {:?}", other.map(|c| c.session_id())),
        }
    }
    a.ping().unwrap();
    assert!(server.client().try_acquire("secret").unwrap().is_none());

    // The right secret while the old connection is still attached: it is
    // told and loses the session.
    let a2 = Client::resume(server.addr, a.session_id(), a.secret(), &options).unwrap();
    assert_eq!(a.events().recv_timeout(WAIT_MAX), Ok(Event::SessionTaken));
    assert_eq!(a.events().recv_timeout(WAIT_MAX), Ok(Event::Disconnected));
    a2.release("secret").unwrap();
    assert!(server.client().try_acquire("secret").unwrap().is_some());
}

/// RESUME on fresh connections, which the kernel spreads over the loops:
/// with 2 loops about half land on the session's home loop and the rest are
/// handed over to it, with the bytes pipelined behind the RESUME.
fn resume_on_any_loop(loops: usize, attempts: usize) {
    let server = TestServer::start(loops);
    let mut homes = vec![0; loops];
    for i in 0..attempts {
        let name = format!("any-loop-{i}");
        let (mut a, id, secret) = RawConn::hello(server.addr, 10_000);
        homes[home_of(id, loops)] += 1;
        assert_eq!(
            a.call(2, &acquire_req(name.as_bytes(), 0, false)).status,
            Status::Ok
        );
        a.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(a.expect_closed(), vec![]);

        let mut b = RawConn::connect(server.addr);
        let second = format!("{name}-second");
        let mut bytes = Vec::new();
        let requests = [
            (1, Request::Ping),
            (
                2,
                Request::Release {
                    name: name.as_bytes(),
                    token: 0,
                },
            ),
            (
                3,
                Request::Resume {
                    session_id: id,
                    secret,
                    password: b"",
                },
            ),
            (
                4,
                Request::Release {
                    name: name.as_bytes(),
                    token: 0,
                },
            ),
            (5, acquire_req(second.as_bytes(), 0, false)),
            (6, Request::Ping),
        ];
        for (request_id, request) in &requests {
            protocol::encode_request(&mut bytes, *request_id, request);
        }
        b.send_bytes(&bytes);
        // The RESUME's listing of holds (HELD, HELD_END) comes along.
        let mut replies: Vec<RawFrame> = Vec::new();
        while replies.len() < requests.len() {
            let frame = b.recv();
            if !matches!(frame.opcode, opcode::HELD | opcode::HELD_END) {
                replies.push(frame);
            }
        }
        replies.sort_by_key(|r| r.request_id);
        let statuses: Vec<(u32, u8, Status)> = replies
            .iter()
            .map(|r| (r.request_id, r.opcode, r.status))
            .collect();
        assert_eq!(
            statuses,
            vec![
                (1, opcode::PING, Status::Ok),
                (2, opcode::RELEASE, Status::NoSession),
                (3, opcode::RESUME, Status::Ok),
                (4, opcode::RELEASE, Status::Ok),
                (5, opcode::ACQUIRE, Status::Ok),
                (6, opcode::PING, Status::Ok),
            ],
            "attempt {i}"
        );
        assert_eq!(
            protocol::parse_session_body(&replies[2].body).unwrap().0,
            id
        );
        assert_eq!(b.call(7, &Request::Bye).status, Status::Ok);
        assert_eq!(b.expect_closed(), vec![]);
        assert!(
            server.client().try_acquire(&second).unwrap().is_some(),
            "BYE released {second}"
        );
    }
    if loops == 2 {
        // Sessions were opened on both loops, so RESUMEs landed on both too.
        assert!(homes.iter().all(|&n| n > 0), "sessions per loop: {homes:?}");
    }
}

#[test]
fn resume_works_whichever_loop_the_new_connection_lands_on() {
    resume_on_any_loop(2, 24);
    resume_on_any_loop(8, 24);
}

#[test]
fn a_password_is_required_when_configured() {
    let server = TestServer::start_with(2, |config| config.password = Some(b"s3cret".to_vec()));
    for password in [None, Some("wrong".to_string())] {
        let options = ClientOptions {
            password,
            ..ClientOptions::default()
        };
        match Client::connect(server.addr, &options) {
            Err(Error::Status(Status::Auth, _)) => {}
            other => panic!("{options:?}: {:?}", other.map(|c| c.session_id())),
        }
    }
    // A refused HELLO closes the connection.
    let mut raw = RawConn::connect(server.addr);
    let hello = Request::Hello {
        grace_ms: 0,
        password: b"s3creT",
        client_name: b"raw",
    };
    assert_eq!(raw.call(1, &hello).status, Status::Auth);
    assert_eq!(raw.expect_closed(), vec![]);

    let options = ClientOptions {
        password: Some("s3cret".into()),
        grace: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let a = server.client_with(&options);
    a.acquire_with("pw", opts(Mode::Exclusive))
        .unwrap()
        .forget();
    a.ping().unwrap();

    // RESUME checks the password too.
    let mut raw = RawConn::connect(server.addr);
    let resume = Request::Resume {
        session_id: a.session_id(),
        secret: a.secret(),
        password: b"",
    };
    assert_eq!(raw.call(1, &resume).status, Status::Auth);
    assert_eq!(raw.expect_closed(), vec![]);
    a.ping().unwrap();
    let a2 = Client::resume(server.addr, a.session_id(), a.secret(), &options).unwrap();
    a2.release("pw").unwrap();
}

#[test]
fn pipelined_requests_all_complete_and_are_matched_by_id() {
    const NAMES: u32 = 300;
    let server = TestServer::start(4);
    let (mut raw, _, _) = RawConn::hello(server.addr, 0);
    let names: Vec<String> = (0..NAMES).map(|i| format!("pipe-{i}")).collect();
    let mut bytes = Vec::new();
    // Ids from a large odd stride so that they are not in send order.
    let id_of = |i: u32, k: u32| (i * 3 + k).wrapping_mul(0x9E37_79B1) | 1;
    for (i, name) in names.iter().enumerate() {
        let i = i as u32;
        protocol::encode_request(
            &mut bytes,
            id_of(i, 0),
            &acquire_req(name.as_bytes(), 0, false),
        );
        protocol::encode_request(&mut bytes, id_of(i, 1), &Request::Ping);
        protocol::encode_request(
            &mut bytes,
            id_of(i, 2),
            &Request::Release {
                name: name.as_bytes(),
                token: 0,
            },
        );
    }
    raw.send_bytes(&bytes);
    let mut seen = std::collections::HashMap::new();
    for _ in 0..NAMES * 3 {
        let reply = raw.recv();
        assert!(
            seen.insert(reply.request_id, reply).is_none(),
            "two replies to one id"
        );
    }
    for i in 0..NAMES {
        let acquired = &seen[&id_of(i, 0)];
        assert_eq!(
            (acquired.opcode, acquired.status),
            (opcode::ACQUIRE, Status::Ok)
        );
        token_of(acquired);
        let ping = &seen[&id_of(i, 1)];
        assert_eq!((ping.opcode, ping.status), (opcode::PING, Status::Ok));
        let released = &seen[&id_of(i, 2)];
        assert_eq!(
            (released.opcode, released.status),
            (opcode::RELEASE, Status::Ok)
        );
    }

    // The client pipelines too: many threads on one connection.
    let client = server.client();
    std::thread::scope(|scope| {
        for thread in 0..16 {
            let client = &client;
            scope.spawn(move || {
                for i in 0..50 {
                    let guard = client
                        .try_acquire(format!("threads-{thread}-{i}"))
                        .unwrap()
                        .unwrap();
                    client.ping().unwrap();
                    guard.release().unwrap();
                }
            });
        }
    });
}

#[test]
fn a_request_id_in_flight_cannot_be_reused() {
    let server = TestServer::start(2);
    let holder = server.client();
    let held = holder.acquire_with("dup", opts(Mode::Exclusive)).unwrap();
    let (mut raw, _, _) = RawConn::hello(server.addr, 0);
    raw.send(7, &acquire_req(b"dup", WAIT_FOREVER, true));
    let queued = raw.recv();
    assert_eq!((queued.request_id, queued.status), (7, Status::Queued));

    let reply = raw.call(
        7,
        &Request::Release {
            name: b"other",
            token: 0,
        },
    );
    assert_eq!(reply.status, Status::DuplicateRequestId);
    let reply = raw.call(7, &acquire_req(b"dup-2", 0, false));
    assert_eq!(reply.status, Status::DuplicateRequestId);
    assert!(
        server.client().try_acquire("dup-2").unwrap().is_some(),
        "the refused acquire did nothing"
    );

    // The original request is unharmed and completes.
    held.release().unwrap();
    let grant = raw.recv();
    assert_eq!(
        (grant.request_id, grant.status, grant.flags),
        (7, Status::Ok, flags::REPLY | flags::PUSH)
    );
    // Now id 7 is free again.
    assert_eq!(
        raw.call(
            7,
            &Request::Release {
                name: b"dup",
                token: 0
            }
        )
        .status,
        Status::Ok
    );
}

#[test]
fn bye_releases_everything_at_once() {
    let server = TestServer::start(4);
    let names = names_on_every_shard("bye", 4, 2);
    // A long grace: only BYE can release these in time.
    let a = server.client_with(&ClientOptions {
        grace: Duration::from_secs(600),
        ..ClientOptions::default()
    });
    for name in &names {
        a.acquire_with(name, opts(Mode::Exclusive))
            .unwrap()
            .forget();
    }
    let holder = server.client();
    let held = holder
        .acquire_with("bye-wait", opts(Mode::Exclusive))
        .unwrap();
    drop(queue(&a, "bye-wait", Mode::Exclusive));

    let waiters: Vec<Client> = names.iter().map(|_| server.client()).collect();
    let (tx, rx) = crossbeam_channel::unbounded();
    for (client, name) in waiters.iter().zip(&names) {
        spawn_wait("waiter", queue(client, name, Mode::Exclusive), &tx);
    }
    a.bye().unwrap();
    let guards: Vec<Guard> = names.iter().map(|_| next_grant(&rx).2).collect();
    assert_eq!(guards.len(), names.len());
    // A's wait for bye-wait ended with it.
    held.release().unwrap();
    assert!(server.client().try_acquire("bye-wait").unwrap().is_some());
}

#[test]
fn shutdown_tells_every_client_and_join_returns() {
    let mut server = TestServer::start(2);
    let a = server.client();
    a.acquire_with("shutdown", opts(Mode::Exclusive))
        .unwrap()
        .forget();
    let b = server.client();
    let (tx, rx) = crossbeam_channel::unbounded();
    spawn_wait("B", queue(&b, "shutdown", Mode::Exclusive), &tx);
    let c = server.client();

    let running = server.server.take().unwrap();
    running.shutdown();
    for client in [&a, &b, &c] {
        assert_eq!(client.events().recv_timeout(WAIT_MAX), Ok(Event::Shutdown));
        assert_eq!(
            client.events().recv_timeout(WAIT_MAX),
            Ok(Event::Disconnected)
        );
    }
    // B's wait ends with its connection (or with a grant, if A's session
    // ended first while the connections were being closed).
    match rx.recv_timeout(WAIT_MAX) {
        Ok((_, _, Ok(_) | Err(Error::Disconnected))) => {}
        Ok((_, _, Err(e))) => panic!("B: {e}"),
        Err(_) => panic!("B's wait did not end"),
    }
    bounded("Server::join", move || running.join()).unwrap();
}

/// Signals through the Rust client: raised on a held lock they are pushed to
/// the holder, queryable by anyone, and cleared once; a free lock has none.
#[test]
fn signals_are_pushed_queried_and_cleared() {
    let server = TestServer::start(2);
    let holder = server.client();
    let other = server.client();
    let _guard = holder.acquire("signalled").unwrap();
    other.signal("signalled", "reload").unwrap();
    let event = holder.events().recv_timeout(WAIT_MAX).expect("pushed");
    assert_eq!(
        event,
        livelock::client::Event::Signal {
            name: b"signalled".to_vec(),
            signal: b"reload".to_vec()
        }
    );
    assert!(other.signal_exists("signalled", "reload").unwrap());
    assert!(other.clear_signal("signalled", "reload").unwrap());
    assert!(!other.clear_signal("signalled", "reload").unwrap());
    assert!(!other.signal_exists("signalled", "reload").unwrap());
    assert!(
        other.signal("free", "reload").is_err(),
        "a free lock cannot be signalled"
    );
}

/// Safety issue, item 9: a guard whose lease ran out, dropped after the
/// same session took the lock again, must not release the newer hold; its
/// EXTEND gets `WrongToken` instead of reviving anything.
#[test]
fn a_stale_guard_does_not_release_a_newer_hold() {
    let server = TestServer::start(2);
    let client = server.client();
    let leased = AcquireOptions {
        lease: Some(Duration::from_millis(50)),
        ..opts(Mode::Exclusive)
    };
    let old = client.acquire_with("relapse", leased).unwrap();
    match client.events().recv_timeout(WAIT_MAX) {
        Ok(Event::LockLost { .. }) => {}
        other => panic!("expected the lease to run out: {other:?}"),
    }
    let new = client.acquire("relapse").unwrap();
    assert!(new.token() > old.token());
    match old.extend(Duration::from_secs(10)) {
        Err(Error::Status(Status::WrongToken, _)) => {}
        other => panic!("a stale EXTEND: {other:?}"),
    }
    drop(old); // releases by its own token: WrongToken, ignored
    let other = server.client();
    assert!(
        other.try_acquire("relapse").unwrap().is_none(),
        "the newer hold is still held"
    );
    new.release().unwrap();
    assert!(other.try_acquire("relapse").unwrap().is_some());
}

/// A session may have 1024 requests in flight, and a RESUME reply lists
/// them all: 32 + 4 + 4 × 1024 = 4132 bytes of body, over the 4096 that
/// bound other replies. Both the raw decoder and the Rust client used to
/// take that reply for a broken stream (FrameTooLarge), so a session with
/// more than 1015 queued acquires could not be resumed.
#[test]
fn a_resume_lists_a_full_in_flight_window() {
    use livelock::limits::IN_FLIGHT_PER_SESSION_MAX;
    let server = TestServer::start(2);
    let names: Vec<Vec<u8>> = (0..IN_FLIGHT_PER_SESSION_MAX)
        .map(|i| format!("window-{i}").into_bytes())
        .collect();
    let (mut blocker, _, _) = RawConn::hello(server.addr, 0);
    let mut batch = Vec::new();
    for (i, name) in names.iter().enumerate() {
        protocol::encode_request(&mut batch, 10 + i as u32, &acquire_req(name, 0, false));
    }
    blocker.send_bytes(&batch);
    for _ in &names {
        assert_eq!(blocker.recv().status, Status::Ok);
    }
    let (mut waiter, id, secret) = RawConn::hello(server.addr, 60_000);
    let ids: Vec<u32> = (0..IN_FLIGHT_PER_SESSION_MAX as u32)
        .map(|i| 5000 + i)
        .collect();
    batch.clear();
    for (name, &request_id) in names.iter().zip(&ids) {
        let request = acquire_req(name, WAIT_FOREVER, true);
        protocol::encode_request(&mut batch, request_id, &request);
    }
    waiter.send_bytes(&batch);
    for _ in &ids {
        let frame = waiter.recv();
        assert_eq!(
            (frame.flags, frame.status),
            (flags::REPLY | flags::INTERIM, Status::Queued)
        );
    }
    drop(waiter);

    let (mut resumed, reply) = RawConn::resume(server.addr, id, secret);
    assert_eq!(reply.body.len(), protocol::RESUME_REPLY_BODY_MAX);
    assert_eq!(
        protocol::parse_resumed_in_flight(&reply.body),
        Some(ids.clone())
    );
    assert_eq!(resumed.recv().opcode, opcode::HELD_END, "no holds yet");
    // The queued acquires are still queued: the blocker's close grants them.
    drop(blocker);
    let mut granted: Vec<u32> = (0..ids.len())
        .map(|_| {
            let frame = resumed.recv();
            assert_eq!((frame.opcode, frame.status), (opcode::ACQUIRE, Status::Ok));
            frame.request_id
        })
        .collect();
    granted.sort_unstable();
    assert_eq!(granted, ids);
}

/// A `PendingAcquire` dropped before its outcome cancels the acquire: the
/// queue empties and, when the holder lets go, nobody is granted a hold
/// that no code knows of (review finding: the grant used to leak).
#[test]
fn a_dropped_pending_acquire_is_cancelled() {
    let server = TestServer::start(2);
    let holder = server.client();
    let guard = holder.acquire("wanted").unwrap();
    let waiter = server.client();
    let mut pending = waiter
        .start_acquire("wanted", AcquireOptions::default(), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());
    drop(pending);
    wait_until("the queue empties", || {
        holder
            .inspect("wanted")
            .unwrap()
            .is_some_and(|found| found.queue.is_empty())
    });
    guard.release().unwrap();
    assert!(
        holder.inspect("wanted").unwrap().is_none(),
        "nobody holds it"
    );
    // A grant kept by wait_queued and then dropped is released too.
    let free = waiter
        .start_acquire("free-one", AcquireOptions::default(), true)
        .map(|mut pending| {
            assert!(pending.wait_queued(WAIT_MAX).unwrap());
            pending
        })
        .unwrap();
    drop(free);
    wait_until("the unclaimed grant is released", || {
        holder.inspect("free-one").unwrap().is_none()
    });
}

/// A server that accepts connections (the kernel's backlog) and never
/// answers — a frozen cluster member — first in the list: after
/// `connect_timeout` the next address opens the session, and RESUME passes
/// it over likewise; alone, it times out.
#[test]
fn a_server_that_never_answers_is_passed_over() {
    let server = TestServer::start(1);
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = black_hole.local_addr().unwrap();
    let options = ClientOptions {
        // Long enough for the real server on a loaded machine; the black
        // hole costs it once per call.
        connect_timeout: Duration::from_secs(2),
        grace: Duration::from_secs(30),
        ..ClientOptions::default()
    };
    let both = [silent, server.addr];
    let client = Client::connect(&both[..], &options).expect("a session at the second address");
    let (id, secret) = (client.session_id(), client.secret());
    client.acquire("passed-over").unwrap().forget();
    drop(client);
    let again = Client::resume(&both[..], id, secret, &options).expect("resumed at the second");
    assert_eq!(again.resumed().unwrap().holds.len(), 1);
    match Client::connect(silent, &options) {
        Err(Error::Io(e)) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a session from a server that never answers"),
    }
}
