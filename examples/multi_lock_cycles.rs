//! Measures what taking several locks costs: one lock cycle (ACQUIRE +
//! RELEASE), three single acquires in byte order then three releases, and
//! one ACQUIRE_ALL of the same three names then three releases — the same
//! client, connections and server, one after the other. The three names of
//! a cycle are on at least two shards of a server of LOOPS loops. Then
//! resource pools, K=2 of N=16 (ACQUIRE_POOL, then the grant released:
//! two resources and the pool queue's permits): each connection from its
//! own pool of 16, and all connections from one shared pool of 16 (8 grants
//! at a time, the others waiting FIFO in the pool's queue).
//!
//! Each connection has its own names (uncontended: the cost of the
//! requests, not of waiting), picked at random among 10,000 per connection.
//! Bounded: each workload runs SECONDS (at most 60) and stops by itself.
//!
//! ```sh
//! cargo build --release --examples
//! target/release/livelock server --threads 2 --durability memory &
//! target/release/examples/multi_lock_cycles 127.0.0.1:7873 2 50 5
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livelock::client::{Client, ClientOptions, Requirement};
use livelock::lock_table::shard_for;
use livelock::protocol::Mode;

/// One connection's names: 10,000 triples, each on at least two shards.
fn triples(conn: usize, loops: usize) -> Vec<[String; 3]> {
    let mut out = Vec::with_capacity(10_000);
    let mut n = 0u64;
    while out.len() < 10_000 {
        let names = [0, 1, 2].map(|k| format!("ml/{conn}/{n}/{k}"));
        n += 1;
        let first = shard_for(names[0].as_bytes(), loops);
        if loops == 1
            || names
                .iter()
                .any(|x| shard_for(x.as_bytes(), loops) != first)
        {
            out.push(names);
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    One,
    ThreeSingles,
    AcquireAll,
    /// 2 of this connection's 16.
    PoolOwn,
    /// 2 of 16 shared by every connection.
    PoolShared,
}

/// Runs `workload` on `clients` for `seconds`: cycles/s, p50 and p99.
fn run(
    clients: &[Arc<Client>],
    names: &[Vec<[String; 3]>],
    workload: Workload,
    seconds: u64,
) -> (f64, Duration, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let threads: Vec<_> = clients
        .iter()
        .zip(names)
        .enumerate()
        .map(|(i, (client, names))| {
            let (client, names, stop) = (client.clone(), names.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                let mut at = i * 7919;
                while !stop.load(Ordering::Relaxed) && samples.len() < 10_000_000 {
                    at = (at + 7919) % names.len();
                    let mut triple = names[at].clone();
                    triple.sort_unstable();
                    let begun = Instant::now();
                    match workload {
                        Workload::One => {
                            client
                                .acquire(&triple[0])
                                .expect("acquire")
                                .release()
                                .expect("release");
                        }
                        Workload::ThreeSingles => {
                            let held: Vec<_> = triple
                                .iter()
                                .map(|n| client.acquire(n).expect("acquire"))
                                .collect();
                            for guard in held {
                                guard.release().expect("release");
                            }
                        }
                        Workload::AcquireAll => {
                            let list: Vec<(&str, Mode)> = triple
                                .iter()
                                .map(|n| (n.as_str(), Mode::Exclusive))
                                .collect();
                            let held = client.acquire_all(&list, None).expect("acquire_all");
                            for guard in held.expect("waits forever") {
                                guard.release().expect("release");
                            }
                        }
                        Workload::PoolOwn | Workload::PoolShared => {
                            let owner = match workload {
                                Workload::PoolOwn => i.to_string(),
                                _ => "shared".into(),
                            };
                            let pool = (0..16).map(|k| format!("pool/{owner}/{k}"));
                            let request = [Requirement::of(2, pool)];
                            let grant = client.acquire_pool(&request, None).expect("acquire_pool");
                            grant.expect("waits forever").release().expect("release");
                        }
                    }
                    samples.push(begun.elapsed());
                }
                samples
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("worker"))
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
    (all.len() as f64 / elapsed, at(0.5), at(0.99))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7873".into());
    let number = |arg: Option<String>, default: u64| {
        arg.map_or(default, |n| n.parse().expect("a whole number"))
    };
    let loops = number(args.next(), 2).max(1) as usize;
    let connections = number(args.next(), 50).clamp(1, 500) as usize;
    let seconds = number(args.next(), 5).clamp(1, 60);
    let clients: Vec<Arc<Client>> = (0..connections)
        .map(|_| {
            Arc::new(Client::connect(addr.as_str(), &ClientOptions::default()).expect("connect"))
        })
        .collect();
    let names: Vec<Vec<[String; 3]>> = (0..connections).map(|c| triples(c, loops)).collect();
    println!(
        "{:<44} {:>10} {:>9} {:>9}  vs 3 singles",
        format!("workload ({connections} connections, pipeline 1)"),
        "cycles/s",
        "p50 us",
        "p99 us"
    );
    let (mut singles, mut one) = (0.0, 0.0);
    for (label, workload) in [
        ("one lock (acquire + release)", Workload::One),
        ("3 names: 3 acquires + 3 releases", Workload::ThreeSingles),
        ("3 names: ACQUIRE_ALL + 3 releases", Workload::AcquireAll),
        ("pool 2 of 16, one per connection", Workload::PoolOwn),
        ("pool 2 of 16, shared by all", Workload::PoolShared),
    ] {
        let (rate, p50, p99) = run(&clients, &names, workload, seconds);
        let versus = match workload {
            Workload::ThreeSingles => {
                singles = rate;
                String::new()
            }
            Workload::AcquireAll => format!("{:.2}x", rate / singles),
            Workload::PoolOwn | Workload::PoolShared => format!("{:.2}x of one lock", rate / one),
            Workload::One => {
                one = rate;
                String::new()
            }
        };
        println!(
            "{label:<44} {rate:>10.0} {:>9} {:>9}  {versus}",
            p50.as_micros(),
            p99.as_micros()
        );
    }
}
