//! Ordered locking over real sockets: a session that declared an order
//! (SET_ORDER: names ascending, or priorities) is refused `OrderViolation`
//! for an acquire that would break it, whatever the shard of the names; the
//! order is kept across a RESUME after a crash of a `--durability log`
//! server; two ordered sessions taking the same names in "opposite" order
//! cannot deadlock (the one that would is refused at once).

mod common;

use common::{data_dir, free_addr, graceful, start_server_with, ScratchDir, TestServer, WAIT_MAX};
use livelock::client::{AcquireOptions, Client, Error};
use livelock::order::Order;
use livelock::protocol::Status;

fn refused(result: livelock::client::Result<impl Sized>) -> bool {
    matches!(result, Err(Error::Status(Status::OrderViolation, _)))
}

#[test]
fn an_ordered_session_is_refused_what_would_break_its_order() {
    // Four loops: the names below live on different shards.
    let server = TestServer::start(4);
    let client = server.client();
    client.set_order(Some(&Order::Ascending)).unwrap();
    let b = client.acquire("b").unwrap();
    assert!(refused(client.try_acquire("a")), "a before b");
    let d = client.acquire("d").unwrap();
    // A pending acquire counts as taken: c is refused while d is held.
    assert!(refused(client.acquire_timeout("c", WAIT_MAX)));
    // Permits are ordered the same way.
    assert!(refused(client.semaphore("a-pool", 2).try_acquire(1)));
    // Once d and b are released, anything goes upward from scratch.
    drop(d);
    drop(b);
    let a = client.acquire("a").unwrap();
    // Not while holding: the order is declared first.
    assert!(refused(client.set_order(None)));
    drop(a);

    // Priorities: z first, then a, then the rest by name.
    let order = Order::priorities([("z", 1), ("a", 2)]).unwrap();
    client.set_order(Some(&order)).unwrap();
    let z = client.acquire("z").unwrap();
    let a = client.acquire("a").unwrap();
    let m = client.acquire("m").unwrap();
    assert!(refused(client.try_acquire("b")), "b ranks before m");
    drop((z, a, m));
    client.set_order(None).unwrap();
    let m = client.acquire("m").unwrap();
    let _a = client.acquire("a").unwrap();
    drop(m);
}

#[test]
fn two_ordered_sessions_cannot_deadlock() {
    let server = TestServer::start(2);
    let (first, second) = (server.client(), server.client());
    for client in [&first, &second] {
        client.set_order(Some(&Order::Ascending)).unwrap();
    }
    // first holds x; second holds y and would wait for x: the classic
    // cycle needs first to then wait for y ... which its order allows, and
    // second's wait for x is what an ordered session may not do.
    let _x = first.acquire("x").unwrap();
    let _y = second.acquire("y").unwrap();
    assert!(refused(second.try_acquire("x")));
    // first may wait for y (upward): second can never be waiting for x.
    let pending = first
        .start_acquire("y", AcquireOptions::default(), true)
        .unwrap();
    drop(_y);
    let y = common::bounded("first's grant of y", move || pending.wait()).unwrap();
    assert!(y.token() > 0);
}

/// The trigger of a deadlock between ordered sessions if waits counted as
/// taken names: second waits for a (held by first), then asks for c. Were
/// c granted first, second would hold c and wait for a below it, and
/// first, taking b then c upward, would close a cycle. So an acquire in
/// flight refuses any other acquire, naming the one in flight.
#[test]
fn an_ordered_session_waits_for_one_name_at_a_time() {
    let server = TestServer::start(2);
    let (first, second) = (server.client(), server.client());
    for client in [&first, &second] {
        client.set_order(Some(&Order::Ascending)).unwrap();
    }
    let a = first.acquire("a").unwrap();
    let pending = second
        .start_acquire("a", AcquireOptions::default(), true)
        .unwrap();
    common::wait_until("second queued for a", || {
        first
            .inspect("a")
            .unwrap()
            .is_some_and(|i| i.queue.len() == 1)
    });
    match second.try_acquire("c") {
        Err(Error::Status(Status::OrderViolation, body)) => assert_eq!(body, "a"),
        Err(other) => panic!("expected OrderViolation naming a, got {other:?}"),
        Ok(_) => panic!("c granted while a is awaited"),
    }
    // Nothing changed: first takes b and c upward; second gets a in turn.
    let _b = first.acquire("b").unwrap();
    let _c = first.acquire("c").unwrap();
    drop(a);
    let a = common::bounded("second's grant of a", move || pending.wait()).unwrap();
    assert!(a.token() > 0);
}

/// ACQUIRE_ALL takes its names in byte order: an ordered session may use
/// it only where its order is byte order for those names (else two ordered
/// sessions could wait for each other), and above what it holds.
#[test]
fn an_ordered_session_takes_several_names_in_its_order_only() {
    use livelock::protocol::Mode::Exclusive as X;
    let server = TestServer::start(2);
    let client = server.client();
    client
        .set_order(Order::priorities([("z", 1)]).as_ref())
        .unwrap();
    // z ranks first, but byte order takes a first: refused, naming z.
    match client.acquire_all(&[("a", X), ("z", X)], None) {
        Err(Error::Status(Status::OrderViolation, name)) => assert_eq!(name, "z"),
        other => panic!(
            "expected OrderViolation, got {:?}",
            other.map(|g| g.is_some())
        ),
    }
    // Names whose order is byte order are fine, above what it holds.
    let _z = client.acquire("z").unwrap();
    let both = client.acquire_all(&[("b", X), ("a", X)], None).unwrap();
    let both = both.expect("free");
    assert_eq!(both.len(), 2);
    drop(both);
    // In byte order, but below a name it holds: refused, naming it.
    let _m = client.acquire("m").unwrap();
    match client.acquire_all(&[("b", X), ("a", X)], None) {
        Err(Error::Status(Status::OrderViolation, name)) => assert_eq!(name, "m"),
        other => panic!(
            "expected OrderViolation, got {:?}",
            other.map(|g| g.is_some())
        ),
    }
}

#[test]
fn the_order_survives_a_crash_of_a_log_server() {
    let dir = ScratchDir::new("order-crash");
    let addr = free_addr();
    let data = data_dir(&dir);
    let start = || start_server_with("log server", &dir, &data, addr, "log", &[]);
    let mut server = start();
    let options = graceful();
    let client = Client::connect(addr, &options).unwrap();
    client.set_order(Some(&Order::Ascending)).unwrap();
    client.acquire("m").unwrap().forget();
    let (id, secret) = (client.session_id(), client.secret());
    server.kill();
    drop(client);
    let _server = start();
    let client = Client::resume(addr, id, secret, &options).unwrap();
    assert!(refused(client.try_acquire("a")), "the order was forgotten");
    assert!(client.try_acquire("n").unwrap().is_some());
}
