//! The shutdown export is a barrier across loops (safety issue, item 3):
//! the dump is exactly the state clients were last told. Clients with a
//! grace period keep taking and releasing locks on every shard, with
//! leases running out, while the server shuts down; each remembers what
//! the replies said it holds. After the restart each one RESUMEs, and the
//! server's listing of its holds must be exactly what it was told — no
//! grant it never heard of, none it heard of missing.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use livelock::client::{AcquireOptions, Client, ClientOptions, Error, Event};
use livelock::protocol::{Mode, Status};

const CLIENTS: usize = 6;
const NAMES: usize = 40;

fn start(dir: &ScratchDir, listen: std::net::SocketAddr) -> TestServer {
    let data_dir = dir.path().to_path_buf();
    TestServer::start_with(4, move |config| {
        config.listen = listen;
        config.data_dir = data_dir;
        config.dump_save = true;
        config.dump_load = true;
        config.release_all_timeout = Duration::from_millis(200);
    })
}

/// What one client was told it holds: name → (token, with a lease).
type Told = BTreeMap<Vec<u8>, (u64, bool)>;

/// Takes and releases random locks until the server says it is shutting
/// down; returns what the replies and pushes said it holds then.
fn churn(client: &Client, seed: u64, stop: &AtomicBool) -> Told {
    let mut told = Told::new();
    let mut x = seed;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let shutting_down = |e: &Error| {
        matches!(
            e,
            Error::Status(Status::ShuttingDown, _) | Error::Disconnected
        )
    };
    while !stop.load(Ordering::Relaxed) {
        // Leases that ran out (pushed) are no longer held.
        while let Ok(event) = client.events().try_recv() {
            match event {
                Event::LockLost { name, token } if told.get(&name).map(|t| t.0) == Some(token) => {
                    told.remove(&name);
                }
                Event::Shutdown => stop.store(true, Ordering::Relaxed),
                _ => {}
            }
        }
        let name = format!("barrier-{}", next() % NAMES as u64).into_bytes();
        let holds_it = told.contains_key(&name);
        if holds_it {
            match client.release(&name) {
                Ok(()) => {
                    told.remove(&name);
                }
                Err(Error::Status(Status::NotHeld, _)) => {
                    told.remove(&name); // its lease ran out; the push follows
                }
                Err(e) if shutting_down(&e) => break,
                Err(e) => panic!("release: {e}"),
            }
        } else {
            let lease = (next() % 3 == 0).then(|| Duration::from_millis(1 + next() % 20));
            let options = AcquireOptions {
                mode: Mode::Exclusive,
                wait: Some(Duration::ZERO),
                lease,
                ..AcquireOptions::default()
            };
            match client.acquire_with(&name, options) {
                Ok(guard) => {
                    told.insert(name, (guard.token(), lease.is_some()));
                    guard.forget();
                }
                Err(Error::Status(Status::Busy, _)) => {}
                Err(e) if shutting_down(&e) => break,
                Err(e) => panic!("acquire: {e}"),
            }
        }
    }
    // Pushes that arrived before the connection closed.
    while let Ok(event) = client.events().recv_timeout(WAIT_MAX) {
        match event {
            Event::LockLost { name, token } if told.get(&name).map(|t| t.0) == Some(token) => {
                told.remove(&name);
            }
            Event::Disconnected => break,
            _ => {}
        }
    }
    told
}

#[test]
fn the_dump_is_exactly_what_clients_were_told() {
    let dir = ScratchDir::new("barrier");
    for round in 0..3 {
        let first = start(&dir, "127.0.0.1:0".parse().unwrap());
        let addr = first.addr;
        let options = ClientOptions {
            grace: Duration::from_secs(60),
            ..ClientOptions::default()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let client = first.client_with(&options);
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let told = churn(&client, 0x9e37_79b9 + i as u64 * 7 + round, &stop);
                    (client.session_id(), client.secret(), told)
                })
            })
            .collect();
        // Let them churn, then shut down in the middle of it.
        let observer = first.client();
        wait_until("the clients to hold locks", || {
            observer.stats().unwrap().locks >= 5
        });
        let mut first = first;
        let server = first.server.take().unwrap();
        server.shutdown();
        let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        server.join().expect("the dump is written");
        let second = start(&dir, addr);
        for (id, secret, told) in results {
            let resumed = Client::resume(second.addr, id, secret, &options).expect("resumes");
            let listed: BTreeMap<Vec<u8>, u64> = resumed
                .resumed()
                .unwrap()
                .holds
                .into_iter()
                .map(|h| (h.name, h.token))
                .collect();
            // Nothing the client was not told of...
            for (name, token) in &listed {
                assert_eq!(
                    told.get(name).map(|t| t.0),
                    Some(*token),
                    "round {round}, session {id:#x}: a hold it was never told of"
                );
            }
            // ...and everything it was told of, but a lease that ran out
            // between the restart and the RESUME.
            for (name, (token, leased)) in &told {
                assert!(
                    *leased || listed.get(name) == Some(token),
                    "round {round}, session {id:#x}: told it holds {name:?}, not listed"
                );
            }
            resumed.bye().unwrap();
        }
        drop(second);
    }
}
