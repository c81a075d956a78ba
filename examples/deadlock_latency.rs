//! Measures deadlock detection: the time from the moment a cycle of waits
//! closes to the moment the failed wait's `Deadlock` reply is read.
//!
//! Each round, A takes `x`, B takes `y` (names vary, so they land on
//! different shards), A queues for `y`, then B queues for `x` — the clock
//! starts when the server confirms B's queue place (the cycle is closed)
//! and stops at B's `Deadlock`. Bounded: at most 1,000 rounds, each wait
//! at most 10 s.
//!
//! ```sh
//! cargo build --release
//! target/release/livelock server --threads 2 &
//! cargo run --release --example deadlock_latency -- 127.0.0.1:7873 50
//! ```

use std::time::{Duration, Instant};

use livelock::client::{AcquireOptions, Client, ClientOptions, Error};
use livelock::protocol::Status;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7873".into());
    let rounds: usize = args
        .next()
        .map_or(50, |n| n.parse().expect("rounds is a number"));
    let connect = || Client::connect(addr.as_str(), &ClientOptions::default()).expect("connect");
    let (a, b) = (connect(), connect());
    let wait = AcquireOptions {
        wait: Some(Duration::from_secs(10)),
        ..AcquireOptions::default()
    };
    let bound = Duration::from_secs(10);
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds.min(1000) {
        let (x, y) = (format!("dl-x-{round}"), format!("dl-y-{round}"));
        let held_x = a.acquire(&x).expect("x");
        let held_y = b.acquire(&y).expect("y");
        let mut a_waits = a.start_acquire(&y, wait, true).expect("A queues");
        assert!(a_waits.wait_queued(bound).expect("A queued"));
        // Queueing times are in ms: B's wait must be the younger one.
        std::thread::sleep(Duration::from_millis(2));
        let mut b_waits = b.start_acquire(&x, wait, true).expect("B queues");
        assert!(b_waits.wait_queued(bound).expect("B queued"));
        let closed = Instant::now();
        match b_waits.wait() {
            Err(Error::Status(Status::Deadlock, _)) => samples.push(closed.elapsed()),
            other => panic!("round {round}: expected Deadlock, got {:?}", other.err()),
        }
        drop(held_y);
        let y = a_waits.wait().expect("A gets y once B let go");
        drop((held_x, y));
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "deadlock detection, {} cycles of 2 across shards: min {:?}, p50 {:?}, p90 {:?}, max {:?}",
        samples.len(),
        samples[0],
        at(0.5),
        at(0.9),
        samples[samples.len() - 1]
    );
}
