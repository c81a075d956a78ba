//! The async client (feature `tokio`) against a real server: the grant and
//! its fencing token, try and timed waits, FIFO hand-over between tasks, a
//! guard dropped in async code releasing its own hold, a lease lost as an
//! event, INSPECT and STATS, a server error as a status, and the
//! disconnection event. Every wait is bounded.

mod common;

use std::time::Duration;

use common::certs::Ca;
use common::{ScratchDir, TestServer, WAIT_MAX};
use livelock::client::{AcquireOptions, ClientOptions, Error, Event, TlsClient};
use livelock::client_async::AsyncClient;
use livelock::protocol::Status;

async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT_MAX, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {WAIT_MAX:?}"))
}

async fn connect(server: &TestServer) -> AsyncClient {
    bounded(
        "connect",
        AsyncClient::connect(server.addr, &ClientOptions::default()),
    )
    .await
    .expect("a session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_tokens_and_hand_over() {
    let server = TestServer::start(2);
    let a = connect(&server).await;
    let b = connect(&server).await;
    let first = bounded("grant", a.acquire("job")).await.unwrap();
    assert!(bounded("try", b.try_acquire("job"))
        .await
        .unwrap()
        .is_none());
    let timed = bounded("timed", b.acquire_timeout("job", Duration::from_millis(50)))
        .await
        .unwrap();
    assert!(timed.is_none(), "TimedOut after the wait");
    // A waiting task is granted when the holder lets go, with a higher token.
    let waiter = tokio::spawn(async move {
        let guard = b.acquire("job").await?;
        Ok::<_, Error>((guard.token(), b, guard))
    });
    let found = loop {
        let found = bounded("inspect", a.inspect("job")).await.unwrap().unwrap();
        if found.queue.len() == 1 {
            break found;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(found.holders[0].token, first.token());
    let token = first.token();
    bounded("release", first.release()).await.unwrap();
    let (granted, b, guard) = bounded("hand-over", waiter).await.unwrap().unwrap();
    assert!(granted > token);
    // Dropped without await: the writer task still sends its RELEASE.
    drop(guard);
    let again = bounded("grant after drop", a.acquire("job")).await.unwrap();
    assert!(again.token() > granted);
    again.forget();
    let stats = bounded("stats", b.stats()).await.unwrap();
    assert_eq!(stats.locks, 1);
    assert!(stats.grants_total >= 3);
    bounded("bye", b.bye()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_and_a_lost_connection_are_events() {
    let server = TestServer::start(1);
    let client = connect(&server).await;
    let lease = AcquireOptions {
        lease: Some(Duration::from_millis(50)),
        ..AcquireOptions::default()
    };
    let guard = bounded("grant", client.acquire_with("leased", lease))
        .await
        .unwrap();
    // The events as a Stream (the same queue `next_event` reads).
    let event = bounded(
        "lock lost",
        std::future::poll_fn(|cx| {
            let mut events = client.events();
            futures_core::Stream::poll_next(std::pin::Pin::new(&mut events), cx)
        }),
    )
    .await;
    assert_eq!(
        event,
        Some(Event::LockLost {
            name: b"leased".to_vec(),
            token: guard.token()
        })
    );
    // Extending a lost hold is refused with the server's status.
    match bounded("extend", guard.extend(Duration::from_secs(1))).await {
        Err(Error::Status(Status::NotHeld, _)) => {}
        other => panic!("extend of a lost hold: {other:?}"),
    }
    guard.forget();
    match bounded("bad name", client.acquire("")).await {
        Err(Error::Status(Status::BadName, _)) => {}
        other => panic!("an empty name: {}", other.is_ok()),
    }
    // The server shuts down: it says so, then the connection ends.
    let stopping = tokio::task::spawn_blocking(move || drop(server));
    assert_eq!(
        bounded("shutdown", client.next_event()).await,
        Some(Event::Shutdown)
    );
    assert_eq!(
        bounded("disconnected", client.next_event()).await,
        Some(Event::Disconnected)
    );
    bounded("the server stops", stopping).await.unwrap();
    assert!(matches!(
        bounded("ping", client.ping()).await,
        Err(Error::Disconnected)
    ));
}

/// The async client over TLS (tokio-rustls), on a server that requires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls() {
    let dir = ScratchDir::new("async-tls");
    let ca = Ca::new(&dir, "server");
    let (cert, key) = ca.issue(&dir, "server", &["127.0.0.1"]);
    let server = TestServer::start_with(1, |config| {
        config.tls = Some(livelock::tls::TlsFiles {
            cert,
            key,
            client_ca: None,
            required: true,
        });
    });
    let options = ClientOptions {
        tls: Some(TlsClient::new(&ca.path, "127.0.0.1", None).unwrap()),
        ..ClientOptions::default()
    };
    let client = bounded(
        "connect over TLS",
        AsyncClient::connect(server.addr, &options),
    )
    .await
    .expect("a session over TLS");
    let guard = bounded("grant", client.acquire("secure")).await.unwrap();
    assert!(guard.token() > 0);
    bounded("release", guard.release()).await.unwrap();
    assert!(bounded(
        "plaintext refused",
        AsyncClient::connect(server.addr, &ClientOptions::default())
    )
    .await
    .is_err());
}

/// A dropped acquire future (a timeout) cancels its acquire, and a dropped
/// client closes its connection: neither leaves a hold behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_futures_and_clients_leaves_no_hold() {
    let server = TestServer::start(2);
    let holder = connect(&server).await;
    let impatient = connect(&server).await;
    let guard = bounded("grant", holder.acquire("wanted")).await.unwrap();
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), impatient.acquire("wanted")).await;
    assert!(gave_up.is_err(), "still queued when the timeout fired");
    // The queue empties (the CANCEL went out), and the lock goes back to
    // free when the holder lets go: nobody was granted it meanwhile.
    loop {
        let found = bounded("inspect", holder.inspect("wanted"))
            .await
            .unwrap()
            .unwrap();
        if found.queue.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    bounded("release", guard.release()).await.unwrap();
    assert!(bounded("inspect", holder.inspect("wanted"))
        .await
        .unwrap()
        .is_none());

    // A client dropped with a hold it forgot: the session ends, the lock frees.
    let forgetful = connect(&server).await;
    bounded("grant", forgetful.acquire("forgotten"))
        .await
        .unwrap()
        .forget();
    drop(forgetful);
    let again = bounded("the lock frees", holder.acquire("forgotten"))
        .await
        .unwrap();
    assert!(again.token() > 0);
    drop(impatient);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphores_and_orders() {
    use livelock::order::Order;
    let server = TestServer::start(2);
    let a = connect(&server).await;
    let b = connect(&server).await;
    let two = bounded("2 of 3", a.acquire_permits("pool", (2, 3), None))
        .await
        .unwrap();
    let zero = Some(Duration::ZERO);
    match bounded("2 more", b.acquire_permits("pool", (2, 3), zero)).await {
        Err(Error::Status(Status::Busy, _)) => {}
        other => panic!("expected Busy, got {:?}", other.map(|g| g.token())),
    }
    match bounded("another capacity", b.acquire_permits("pool", (1, 4), zero)).await {
        Err(Error::Status(Status::CapacityConflict, _)) => {}
        other => panic!(
            "expected CapacityConflict, got {:?}",
            other.map(|g| g.token())
        ),
    }
    bounded("raise", b.set_capacity("pool", 4)).await.unwrap();
    let more = bounded("2 of 4", b.acquire_permits("pool", (2, 4), zero))
        .await
        .unwrap();
    assert!(more.token() > two.token());
    // Not while holding: an order is declared first.
    match bounded("order", a.set_order(Some(&Order::Ascending))).await {
        Err(Error::Status(Status::OrderViolation, _)) => {}
        other => panic!("expected OrderViolation, got {other:?}"),
    }
    // An ordered session is refused a name below what it holds; the reply
    // names what it conflicts with.
    let c = connect(&server).await;
    bounded("order", c.set_order(Some(&Order::Ascending)))
        .await
        .unwrap();
    let _q = bounded("q", c.acquire("q")).await.unwrap();
    match bounded("p", c.try_acquire("p")).await {
        Err(Error::Status(Status::OrderViolation, name)) => assert_eq!(name, "q"),
        other => panic!(
            "expected OrderViolation, got {:?}",
            other.map(|g| g.is_some())
        ),
    }
}

/// ACQUIRE_ALL: every name with its token, in order; a try that finds one
/// taken gets nothing; a future dropped while it waits cancels it, and
/// nothing it had taken stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_all_is_all_or_nothing() {
    use livelock::protocol::Mode::{Exclusive, Shared};
    let server = TestServer::start(2);
    let (a, b) = (connect(&server).await, connect(&server).await);
    let names = [("m1", Exclusive), ("m2", Shared), ("m3", Exclusive)];
    let held = bounded("all three", a.acquire_all(&names, None))
        .await
        .unwrap()
        .expect("free");
    let got: Vec<&[u8]> = held.iter().map(|g| g.name()).collect();
    assert_eq!(got, [&b"m1"[..], b"m2", b"m3"]);
    let zero = Some(Duration::ZERO);
    let none = bounded(
        "a try",
        b.acquire_all(&[("m0", Exclusive), ("m3", Exclusive)], zero),
    )
    .await;
    assert!(none.unwrap().is_none());
    assert!(bounded("m0 free", b.try_acquire("m0"))
        .await
        .unwrap()
        .is_some());
    // B waits for m3 (holding m4 meanwhile); dropping the future cancels.
    let waiting = b.acquire_all(&[("m4", Exclusive), ("m3", Exclusive)], None);
    let timed_out = tokio::time::timeout(Duration::from_millis(100), waiting).await;
    assert!(timed_out.is_err(), "m3 is held by A");
    let c = connect(&server).await;
    let mut freed = false;
    for _ in 0..500 {
        if let Some(guard) = bounded("m4", c.try_acquire("m4")).await.unwrap() {
            drop(guard);
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "m4 was not given back after the cancel");
    drop(held);
}

/// A server that accepts connections (the kernel's backlog) and never
/// answers — a frozen cluster member — first in the list: after
/// `connect_timeout` the next address opens the session. Alone, it times
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_passed_over() {
    let server = TestServer::start(1);
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = black_hole.local_addr().unwrap();
    let options = ClientOptions {
        // Long enough for the real server on a loaded machine; the black
        // hole costs it once per call.
        connect_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let client = bounded(
        "connect",
        AsyncClient::connect(&[silent, server.addr][..], &options),
    )
    .await
    .expect("a session at the second address");
    bounded("ping", client.ping()).await.unwrap();
    match bounded("connect", AsyncClient::connect(silent, &options)).await {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a session from a server that never answers"),
    }
}
