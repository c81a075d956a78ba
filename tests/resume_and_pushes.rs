//! What a client is owed across a dropped or half-closed connection, and
//! what pushes may cost it (safety issue, items 7 and 10), over real
//! sockets against an in-process server:
//! - RESUME lists the requests still in flight and every lock the session
//!   holds (HELD pushes, then HELD_END), written as the connection drains,
//!   so a session with megabytes of holds resumes without being closed;
//! - a lock lost while detached is not parked (the listing says it);
//! - a half-closed connection gets every reply it is owed, then closes;
//! - signal pushes never make a holder that does not read lose its locks.

mod common;

use std::io::Read;
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use livelock::client::{AcquireOptions, Client, ClientOptions, HeldLock};
use livelock::lock_table::shard_for;
use livelock::protocol::{self, opcode, Mode, Request, SignalKind, Status};

fn graceful() -> ClientOptions {
    ClientOptions {
        grace: Duration::from_secs(30),
        ..ClientOptions::default()
    }
}

/// A 1000-byte lock name, distinct per `i`.
fn long_name(i: usize) -> Vec<u8> {
    let mut name = format!("long-{i:06}-").into_bytes();
    name.resize(1000, b'x');
    name
}

/// Takes `count` locks with 1000-byte names, pipelined; each with `lease`.
fn take_many(client: &Client, count: usize, lease: Option<Duration>) -> Vec<(Vec<u8>, u64)> {
    let options = AcquireOptions {
        mode: Mode::Exclusive,
        wait: None,
        lease,
        ..AcquireOptions::default()
    };
    // In batches the session's in-flight limit (1024) allows.
    let mut taken = Vec::with_capacity(count);
    for batch in (0..count).collect::<Vec<_>>().chunks(500) {
        let pending: Vec<_> = batch
            .iter()
            .map(|&i| client.start_acquire(long_name(i), options, false).unwrap())
            .collect();
        for p in pending {
            let guard = p.wait().unwrap();
            taken.push((guard.name().to_vec(), guard.token()));
            guard.forget();
        }
    }
    taken
}

/// Items 7 and 10: a session holding 5000 locks with 1000-byte names
/// (5 MB of listing, past the 4 MiB write-buffer bound) resumes, gets all
/// of them listed with their tokens, and is not closed.
#[test]
fn a_resume_lists_megabytes_of_holds_without_closing_the_connection() {
    let server = TestServer::start(2);
    let holder = server.client_with(&graceful());
    let mut taken = take_many(&holder, 5000, None);
    let (id, secret) = (holder.session_id(), holder.secret());
    drop(holder);
    let resumed = Client::resume(server.addr, id, secret, &graceful()).expect("resumes");
    let listing = resumed.resumed().expect("a RESUME's listing");
    assert!(listing.in_flight.is_empty());
    taken.sort();
    let held: Vec<(Vec<u8>, u64)> = listing
        .holds
        .iter()
        .map(|h: &HeldLock| (h.name.clone(), h.token))
        .collect();
    assert_eq!(held.len(), 5000);
    assert_eq!(held, taken, "every hold, by name, with its token");
    assert!(listing.holds.iter().all(|h| h.mode == Mode::Exclusive));
    resumed.ping().expect("the resumed connection still serves");
}

/// Item 10: LOCK_LOST pushes are not parked for a detached session (5000
/// leases running out used to park 5 MB, and every RESUME was closed for
/// overflowing the write buffer); the listing simply no longer has them.
#[test]
fn locks_lost_while_detached_are_not_parked_and_not_listed() {
    let server = TestServer::start(2);
    let holder = server.client_with(&graceful());
    take_many(&holder, 5000, Some(Duration::from_millis(500)));
    holder.acquire("kept").unwrap().forget();
    let (id, secret) = (holder.session_id(), holder.secret());
    drop(holder);
    let observer = server.client();
    wait_until("the leases to run out", || {
        observer.stats().unwrap().locks == 1
    });
    let (mut raw, _) = RawConn::resume(server.addr, id, secret);
    let mut frames = Vec::new();
    loop {
        let frame = raw.recv();
        let end = frame.opcode == opcode::HELD_END;
        frames.push((frame.opcode, frame.body.get(9..).unwrap_or(&[]).to_vec()));
        if end {
            break;
        }
    }
    assert_eq!(
        frames,
        [
            (opcode::HELD, b"kept".to_vec()),
            (opcode::HELD_END, Vec::new())
        ],
        "nothing parked but the listing"
    );
}

/// Item 7: pipelined requests to every shard, then shutdown(SHUT_WR): every
/// reply arrives before the server closes (it used to close first about
/// one time in three).
#[test]
fn a_half_closed_connection_gets_every_reply_it_is_owed() {
    let server = TestServer::start(4);
    // Names on each of the four shards, so replies come from other loops.
    let names: Vec<String> = (0..)
        .map(|i| format!("half-{i}"))
        .scan([0usize; 4], |seen, name| {
            let shard = shard_for(name.as_bytes(), 4);
            seen[shard] += 1;
            Some((name, seen[shard] <= 4))
        })
        .filter(|(_, keep)| *keep)
        .map(|(name, _)| name)
        .take(16)
        .collect();
    for round in 0..30 {
        let (mut raw, _, _) = RawConn::hello(server.addr, 0);
        let mut bytes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let request = Request::Acquire {
                name: name.as_bytes(),
                mode: Mode::Exclusive,
                weight: 1,
                capacity: 0,
                wait_ms: 0,
                lease_ms: 0,
                notify_queued: false,
            };
            protocol::encode_request(&mut bytes, 10 + i as u32, &request);
        }
        raw.send_bytes(&bytes);
        raw.stream.shutdown(Shutdown::Write).unwrap();
        let frames = raw.expect_closed();
        let mut ids: Vec<u32> = frames.iter().map(|f| f.request_id).collect();
        ids.sort_unstable();
        let want: Vec<u32> = (10..10 + names.len() as u32).collect();
        assert_eq!(ids, want, "round {round}: replies owed before the close");
        // Busy when the last round's session has not ended on every shard yet.
        assert!(frames
            .iter()
            .all(|f| matches!(f.status, Status::Ok | Status::Busy)));
    }
}

/// Item 10: a holder that does not read its socket is not closed (and does
/// not lose its locks) however many signals others raise on its locks:
/// past the pause mark, pushes are dropped and counted; a signal raised
/// again while set is not pushed at all.
#[test]
fn signal_pushes_never_cost_a_holder_its_locks() {
    let server = TestServer::start(2);
    let (mut holder, _, _) = RawConn::hello(server.addr, 0);
    let locks: Vec<Vec<u8>> = (0..100).map(long_name).collect();
    for (i, name) in locks.iter().enumerate() {
        let request = Request::Acquire {
            name,
            mode: Mode::Exclusive,
            weight: 1,
            capacity: 0,
            wait_ms: 0,
            lease_ms: 0,
            notify_queued: false,
        };
        assert_eq!(holder.call(i as u32 + 2, &request).status, Status::Ok);
    }
    // From now on the holder reads nothing. 100 locks × 64 signals × ~2 KiB
    // of push each is 13 MB, far past the 4 MiB that closes a connection.
    let (mut raiser, _, _) = RawConn::hello(server.addr, 0);
    let mut request_id = 1;
    for name in &locks {
        let mut bytes = Vec::new();
        for s in 0..64 {
            let mut signal = format!("sig-{s}-").into_bytes();
            signal.resize(1000, b's');
            let raise = Request::Signal {
                name,
                signal: &signal,
                op: SignalKind::Raise,
            };
            request_id += 1;
            protocol::encode_request(&mut bytes, request_id, &raise);
        }
        raiser.send_bytes(&bytes);
        for _ in 0..64 {
            assert_eq!(raiser.recv().status, Status::Ok);
        }
    }
    let probe = server.client();
    for name in &locks {
        assert!(
            probe.try_acquire(name).unwrap().is_none(),
            "the holder kept its lock"
        );
    }
    // The holder's connection is still open: draining it ends in silence,
    // not in a close.
    holder
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut sink = vec![0u8; 1 << 16];
    loop {
        match holder.stream.read(&mut sink) {
            Ok(0) => panic!("the server closed the holder's connection"),
            Ok(_) => {}
            Err(_) => break, // timed out: drained, still open
        }
    }
}

/// Item 7: a reply the server had produced but not yet sent when the
/// connection dropped is parked and reaches the RESUME. The waiter stops
/// reading and floods PINGs (id 0, which nothing keeps) until the server
/// stops reading it; then its queued acquire is granted — behind the PING
/// replies that do not fit the socket — and the connection is reset. The
/// grant used to be lost with the connection's buffer.
#[test]
fn a_grant_unsent_when_the_connection_dropped_reaches_the_resume() {
    use std::io::Write;
    // One loop: the release and the grant it makes happen in one step.
    let server = TestServer::start(1);
    let holder = server.client();
    holder.acquire("unsent").unwrap().forget();
    let (mut waiter, id, secret) = RawConn::hello(server.addr, 30_000);
    let acquire = Request::Acquire {
        name: b"unsent",
        mode: Mode::Exclusive,
        weight: 1,
        capacity: 0,
        wait_ms: protocol::WAIT_FOREVER,
        lease_ms: 0,
        notify_queued: true,
    };
    waiter.send(7, &acquire);
    assert_eq!(waiter.recv().status, Status::Queued);
    // Flood until a write blocks: every buffer between us is full and the
    // server no longer reads this connection.
    let mut pings = Vec::new();
    for _ in 0..4096 {
        protocol::encode_request(&mut pings, 0, &Request::Ping);
    }
    waiter
        .stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut written = 0usize;
    // Until writes make no progress for 3 × 500 ms in a row: the server
    // stopped reading (not merely a busy moment of a loaded machine).
    let mut stalls = 0;
    while stalls < 3 {
        match waiter.stream.write(&pings) {
            Ok(n) => {
                written += n;
                stalls = 0;
            }
            Err(_) => stalls += 1,
        }
        assert!(written < 1 << 30, "the server never stopped reading");
    }
    holder.release("unsent").unwrap(); // grants request 7, into the stuck buffer
    socket2::SockRef::from(&waiter.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(waiter); // reset
    let observer = server.client();
    wait_until("the waiter detached", || {
        observer.stats().unwrap().sessions_detached == 1
    });
    let (mut resumed, reply) = RawConn::resume(server.addr, id, secret);
    assert_eq!(protocol::parse_resumed_in_flight(&reply.body), Some(vec![]));
    let mut frames = Vec::new();
    loop {
        let frame = resumed.recv();
        let end = frame.opcode == opcode::HELD_END;
        frames.push((frame.opcode, frame.request_id, frame.status));
        if end {
            break;
        }
    }
    assert_eq!(
        frames,
        [
            (opcode::ACQUIRE, 7, Status::Ok),
            (opcode::HELD, 0, Status::Ok),
            (opcode::HELD_END, 0, Status::Ok)
        ],
        "the unsent grant, then the listing"
    );
}
