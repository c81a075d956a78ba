//! Measures the time from `kill -9` of a lock holder to the next waiter's
//! grant: the number that says how fast a crashed process's lock moves on.
//!
//! The holder is a real `livelock run NAME -- sleep 60` process; the waiter
//! is queued behind it (the server confirms the queue place); the clock runs
//! from just before SIGKILL to the moment the pushed grant is read.
//!
//! ```sh
//! cargo build --release
//! target/release/livelock server &
//! cargo run --release --example kill_to_grant -- 127.0.0.1:7873 20
//! ```

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use livelock::client::{AcquireOptions, Client, ClientOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7873".into());
    let rounds: usize = args
        .next()
        .map_or(20, |n| n.parse().expect("rounds is a number"));
    let exe = std::env::current_exe().expect("own path");
    let livelock = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("livelock"))
        .expect("target dir");
    let waiter = Client::connect(addr.as_str(), &ClientOptions::default()).expect("connect");
    let prober = Client::connect(addr.as_str(), &ClientOptions::default()).expect("connect");
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds.min(1000) {
        let name = format!("kill-to-grant-{}-{round}", std::process::id());
        let mut holder = Command::new(&livelock)
            .args(["run", "--server", &addr, &name, "--", "sleep", "60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start livelock run");
        // Wait (bounded) until the holder has the lock.
        let start = Instant::now();
        loop {
            match prober.try_acquire(&name).expect("probe") {
                None => break,
                Some(guard) => drop(guard),
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "holder never got the lock"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut pending = waiter
            .start_acquire(&name, AcquireOptions::default(), true)
            .expect("queue");
        assert!(pending
            .wait_queued(Duration::from_secs(10))
            .expect("queued"));
        let killed_at = Instant::now();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(holder.id() as libc::pid_t, libc::SIGKILL) };
        let guard = pending.wait().expect("granted after the holder died");
        samples.push(killed_at.elapsed());
        drop(guard);
        let _ = holder.wait();
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "kill -9 to next grant over {} rounds: min {:?}, p50 {:?}, p90 {:?}, max {:?}",
        samples.len(),
        samples[0],
        pct(0.5),
        pct(0.9),
        samples[samples.len() - 1]
    );
}
