//! Criterion benchmark of cross-shard hand-off through a real server on
//! 127.0.0.1: an acquire+release round trip for a lock owned by the client's
//! own loop versus one owned by the other loop (crossbeam channel + Waker
//! hop each way). The difference is the cost of the hop.

use criterion::{criterion_group, criterion_main, Criterion};
use livelock::client::{Client, ClientOptions};
use livelock::config::ServerConfig;
use livelock::lock_table::shard_for;
use livelock::server::Server;
use livelock::session::home_of;

const LOOPS: usize = 2;

fn name_on(shard: usize, tag: &str) -> String {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .find(|name| shard_for(name.as_bytes(), LOOPS) == shard)
        .expect("some name hashes to every shard")
}

fn hand_off(c: &mut Criterion) {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.threads = LOOPS;
    let server = Server::start(config).expect("server starts");
    let client = Client::connect(server.local_addr(), &ClientOptions::default()).expect("connect");
    let home = home_of(client.session_id(), LOOPS);
    let local = name_on(home, "local");
    let remote = name_on((home + 1) % LOOPS, "remote");
    c.bench_function("cross_shard/acquire+release, lock on own loop", |b| {
        b.iter(|| {
            client
                .try_acquire(&local)
                .unwrap()
                .expect("free")
                .release()
                .unwrap()
        })
    });
    c.bench_function("cross_shard/acquire+release, lock on other loop", |b| {
        b.iter(|| {
            client
                .try_acquire(&remote)
                .unwrap()
                .expect("free")
                .release()
                .unwrap()
        })
    });
    drop(client);
    server.shutdown();
    server.join().expect("clean exit");
}

criterion_group!(benches, hand_off);
criterion_main!(benches);
