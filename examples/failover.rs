//! Measures failover: the time from `kill -9` of a cluster's leader to the
//! first grant served by the new leader, over a number of rounds.
//!
//! It runs its own 3-node cluster of `target/<profile>/livelock` on
//! 127.0.0.91..93 (peer ports 27891..93, client ports 27881..83), data in
//! a temporary directory. Each round: find the leader (CLUSTER_STATUS),
//! SIGKILL it, then try a fresh lock through the other nodes every 5 ms
//! until one is granted; restart the killed node and wait until every
//! member is replicating again. Every wait is bounded (30 s). Each round
//! also says when the new leader's log said it was elected and when it
//! serves (by the wall clock): the election, then the new leader's
//! restore, apart from the prober's own delays.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/failover 20
//! ```

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livelock::client::{Client, ClientOptions};

const WAIT_MAX: Duration = Duration::from_secs(30);

struct Node {
    id: u64,
    client: SocketAddr,
    child: Option<Child>,
}

fn spawn(livelock: &std::path::Path, dir: &std::path::Path, node: &Node, peers: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("node{}.log", node.id)))
        .expect("log file");
    Command::new(livelock)
        .args([
            "server",
            "--threads",
            "1",
            "--node-id",
            &node.id.to_string(),
        ])
        .args(["--peers", peers, "--listen", &node.client.to_string()])
        .arg("--data-dir")
        .arg(dir.join(format!("node{}", node.id)))
        .env("LIVELOCK_CLUSTER_SECRET", "failover benchmark secret")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start a node")
}

/// Seconds since midnight (UTC) of `at`.
fn seconds_of_day(at: std::time::SystemTime) -> f64 {
    let since = at
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    since.as_secs_f64().rem_euclid(86_400.0)
}

/// When node `id`'s log last said `what`: seconds since midnight, from
/// the line's `...THH:MM:SS.ffffffZ` stamp.
fn last_said(dir: &std::path::Path, id: u64, what: &str) -> Option<f64> {
    let log = std::fs::read_to_string(dir.join(format!("node{id}.log"))).ok()?;
    let line = log.lines().rev().find(|l| l.contains(what))?;
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    let (h, m, s): (f64, f64, f64) = (h.parse().ok()?, m.parse().ok()?, s.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

fn options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_millis(500),
        ..ClientOptions::default()
    }
}

/// The leader's id and whether every member replicates with no lag, as
/// the first node that answers says.
fn status(nodes: &[Node]) -> Option<(u64, bool)> {
    for node in nodes.iter().filter(|n| n.child.is_some()) {
        if let Ok(client) = Client::connect(node.client, &options()) {
            if let Ok(reply) = client.cluster_status() {
                let settled = reply.members.len() == nodes.len()
                    && reply
                        .members
                        .iter()
                        .all(|m| m.active && m.state == 1 && m.matched == reply.commit);
                return (reply.node != 0).then_some((reply.node, settled));
            }
        }
    }
    None
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(20, |n| n.parse().expect("rounds is a number"))
        .min(1000);
    let exe = std::env::current_exe().expect("own path");
    let livelock = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("livelock"))
        .expect("target dir");
    let dir = std::env::temp_dir().join(format!("livelock-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node {
            id,
            client: SocketAddr::from(([127, 0, 0, 90 + id as u8], 27880 + id as u16)),
            child: None,
        })
        .collect();
    let peers = (1..=3u64)
        .map(|id| format!("{id}=127.0.0.{}:{}", 90 + id, 27890 + id))
        .collect::<Vec<_>>()
        .join(",");
    for node in &mut nodes {
        node.child = Some(spawn(&livelock, &dir, node, &peers));
    }
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let start = Instant::now();
        let leader = loop {
            match status(&nodes) {
                Some((leader, true)) => break leader,
                _ => {
                    assert!(start.elapsed() < WAIT_MAX, "the cluster never settled");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let node = &mut nodes[leader as usize - 1];
        let mut child = node.child.take().expect("running");
        let killed_at = Instant::now();
        let killed_wall = seconds_of_day(std::time::SystemTime::now());
        child.kill().expect("SIGKILL");
        let name = format!("failover-{}-{round}", std::process::id());
        let granted = 'granted: loop {
            for other in nodes.iter().filter(|n| n.child.is_some()) {
                if let Ok(client) = Client::connect(other.client, &options()) {
                    if let Ok(Some(_guard)) = client.try_acquire(&name) {
                        break 'granted killed_at.elapsed();
                    }
                }
            }
            assert!(
                killed_at.elapsed() < WAIT_MAX,
                "no grant after the failover"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = child.wait();
        // When the survivors' logs said so, after the kill.
        let after = |what: &str| {
            let first = nodes
                .iter()
                .filter(|n| n.child.is_some())
                .filter_map(|n| last_said(&dir, n.id, what))
                .map(|at| (at - killed_wall).rem_euclid(86_400.0))
                .filter(|&after| after < WAIT_MAX.as_secs_f64())
                .reduce(f64::min);
            first.map_or("?".to_string(), |s| format!("{:.0} ms", s * 1000.0))
        };
        println!(
            "round {round}: leader {leader} killed, a new one elected after {}, serving after {}, \
             first grant after {granted:?}",
            after("elected leader at entry"),
            after("serving as the leader")
        );
        samples.push(granted);
        let node = &mut nodes[leader as usize - 1];
        node.child = Some(spawn(&livelock, &dir, node, &peers));
    }
    for node in &mut nodes {
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    samples.sort();
    if samples.is_empty() {
        return;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "failover over {} rounds: p50 {:.0} ms, max {:.0} ms, min {:.0} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
        ms(samples[0])
    );
}
