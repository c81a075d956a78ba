//! A replicated cluster of real server processes on loopback, peer links
//! through fault-injecting relays: failover keeps holds, queue places and
//! fencing order; a cut-off leader never grants and its clients learn it;
//! SIGTERM hands leadership over and a rolling restart loses no hold; a
//! register guarded by the lock sees no double grant and no lost update
//! under crashes and partitions.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::{this_run, Follow, TestCluster};
use common::*;
use livelock::client::{AcquireOptions, Client, ClientOptions, Error};
use livelock::cluster::proxy::NOT_RELAYED;

/// Who holds `name` (session, token) and who waits, first first, as the
/// cluster answers through any live node.
fn holders_and_queue(cluster: &mut TestCluster, name: &str) -> (Vec<(u64, u64)>, Vec<u64>) {
    let addrs = cluster.live_clients();
    let observer = Follow::connect(&addrs, "observer", Duration::ZERO);
    let found = observer.client.inspect(name).expect("inspect");
    let _ = observer.client.bye();
    match found {
        None => (Vec::new(), Vec::new()),
        Some(inspection) => (
            inspection
                .record
                .holders
                .iter()
                .map(|h| (h.session, h.token))
                .collect(),
            inspection.queue.iter().map(|w| w.session).collect(),
        ),
    }
}

/// kill -9 of the leader: a new one is elected and serves; the holder
/// resumes through another node and keeps its hold and token, the waiter
/// keeps its place, and the next grant's token is higher. The killed node
/// comes back as a follower.
#[test]
fn failover_keeps_holds_queue_places_and_token_order() {
    let mut cluster = TestCluster::start("cluster-failover", 3, 10);
    let leader = cluster.leader();
    let addrs = cluster.live_clients();
    let mut holder = Follow::connect(&addrs, "holder", Duration::from_secs(60));
    let first = holder.client.acquire("x").unwrap();
    let token = first.token();
    first.forget();
    let waiter = Follow::connect(&addrs, "waiter", Duration::from_secs(60));
    let mut pending = waiter
        .client
        .start_acquire("x", AcquireOptions::default(), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap(), "the waiter queues");
    let (holder_id, waiter_id) = (holder.session_id(), waiter.session_id());

    cluster.kill(leader);
    let new_leader = cluster.leader();
    assert_ne!(new_leader, leader);
    let live = cluster.live_clients();
    let resumed = holder.resume(&live);
    assert_eq!(resumed.holds.len(), 1, "the hold survives: {resumed:?}");
    assert_eq!(
        (resumed.holds[0].name.as_slice(), resumed.holds[0].token),
        (&b"x"[..], token)
    );
    let (holders, queue) = holders_and_queue(&mut cluster, "x");
    assert_eq!(holders, vec![(holder_id, token)]);
    assert_eq!(queue, vec![waiter_id], "the waiter keeps its place");

    // The old leader rejoins as a follower.
    cluster.restart(leader);
    holder.client.release("x").unwrap();
    let (holders, _) = holders_and_queue(&mut cluster, "x");
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].0, waiter_id, "the waiter is granted next");
    assert!(holders[0].1 > token, "tokens increase across the failover");
    drop(pending);
}

/// A leader cut off from the majority grants nothing: its client's
/// acquire is never answered with a grant, and the node restarts itself
/// as a follower (its clients see the connection end; the process does
/// not exit) while the majority elects a leader that grants the lock.
/// Healed, it follows the new history.
#[test]
fn a_cut_off_leader_never_grants() {
    let mut cluster = TestCluster::start("cluster-minority", 3, 20);
    let leader = cluster.leader();
    let direct = Client::connect(
        cluster.client_addr(leader),
        &ClientOptions {
            client_name: "on-the-old-leader".into(),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    cluster.isolate(leader);
    let outcome = bounded("the cut-off leader's answer", move || {
        direct.try_acquire("y")
    });
    match outcome {
        Err(Error::Disconnected) | Err(Error::Io(_)) => {}
        Ok(Some(guard)) => panic!("a cut-off leader granted token {}", guard.token()),
        Ok(None) => panic!("a cut-off leader answered busy"),
        Err(e) => panic!("a cut-off leader answered {e}"),
    }
    let pid = cluster.nodes[leader as usize - 1]
        .process
        .as_ref()
        .unwrap()
        .id();
    cluster.wait_rejoined(leader);
    let new_leader = cluster.leader();
    assert_ne!(new_leader, leader);
    let addrs = cluster.live_clients();
    let majority = Follow::connect(&addrs, "on-the-majority", Duration::ZERO);
    let guard = majority.client.try_acquire("y").unwrap().expect("free");
    cluster.heal();
    // Through the old leader, now a follower (it relays to the leader).
    let via_old = Client::connect(cluster.client_addr(leader), &ClientOptions::default()).unwrap();
    let seen = via_old.inspect("y").unwrap().expect("held");
    assert_eq!(seen.record.holders[0].session, majority.session_id());
    assert_eq!(seen.record.holders[0].token, guard.token());
    // The same process all along, and a member again: the leader counts
    // it caught up.
    let process = cluster.nodes[leader as usize - 1].process.as_mut().unwrap();
    assert_eq!(process.id(), pid);
    assert!(process.try_wait().is_none());
    cluster.wait_caught_up(&via_old, leader);
}

/// SIGTERM on each node in turn, leader included, each restarted before
/// the next: the leader hands over first (exit 0), and no hold or queue
/// place is lost, tokens unchanged.
#[test]
fn a_rolling_restart_loses_no_hold() {
    let mut cluster = TestCluster::start("cluster-rolling", 3, 30);
    cluster.leader();
    let addrs = cluster.live_clients();
    let mut holder = Follow::connect(&addrs, "holder", Duration::from_secs(60));
    let tokens: Vec<u64> = ["r1", "r2"]
        .iter()
        .map(|name| {
            let guard = holder.client.acquire(name).unwrap();
            let token = guard.token();
            guard.forget();
            token
        })
        .collect();
    let waiter = Follow::connect(&addrs, "waiter", Duration::from_secs(60));
    let mut pending = waiter
        .client
        .start_acquire("r1", AcquireOptions::default(), true)
        .unwrap();
    assert!(pending.wait_queued(WAIT_MAX).unwrap());
    for id in 1..=3 {
        let was_leader = cluster.leader() == id;
        signal(
            cluster.nodes[id as usize - 1].process.as_ref().unwrap(),
            libc::SIGTERM,
        );
        let (status, log) = cluster.wait_exit(id);
        assert!(status.success(), "node {id} stops cleanly: {status}; {log}");
        assert_eq!(
            log.contains("handing leadership to node"),
            was_leader,
            "only the leader hands over: {log}"
        );
        cluster.restart(id);
        cluster.leader();
        let live = cluster.live_clients();
        let resumed = holder.resume(&live);
        let mut held: Vec<(Vec<u8>, u64)> = resumed
            .holds
            .iter()
            .map(|h| (h.name.clone(), h.token))
            .collect();
        held.sort();
        assert_eq!(
            held,
            vec![(b"r1".to_vec(), tokens[0]), (b"r2".to_vec(), tokens[1])],
            "after restarting node {id}"
        );
        let (_, queue) = holders_and_queue(&mut cluster, "r1");
        assert_eq!(
            queue,
            vec![waiter.session_id()],
            "after restarting node {id}"
        );
    }
    drop(pending);
}

/// What the guarded register saw: it takes a write only with a fencing
/// token above every one before (a stale holder's write is rejected).
#[derive(Default, Debug)]
struct Register {
    value: u64,
    last_token: u64,
    /// The worker inside its critical section, if any.
    inside: Option<usize>,
    violations: Vec<String>,
    /// Tokens in the order the register took them.
    history: Vec<u64>,
}

impl Register {
    /// A holder's read-modify-write, fenced by `token`.
    fn enter(&mut self, worker: usize, token: u64) {
        if let Some(other) = self.inside {
            self.violations.push(format!(
                "double grant: worker {worker} (token {token}) while worker {other} holds"
            ));
        }
        if token <= self.last_token {
            self.violations.push(format!(
                "stale token {token} after {} (worker {worker})",
                self.last_token
            ));
            return;
        }
        self.inside = Some(worker);
        self.last_token = token;
        self.history.push(token);
        self.value += 1;
    }

    fn leave(&mut self, worker: usize) {
        if self.inside == Some(worker) {
            self.inside = None;
        }
    }
}

/// One worker: take "reg", read-modify-write the register, release;
/// after any error resume the session (it must still exist: no hold is
/// lost within its grace), end it, and start a fresh one.
fn worker(
    id: usize,
    addrs: Vec<std::net::SocketAddr>,
    register: Arc<Mutex<Register>>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) {
    let grace = Duration::from_secs(30);
    let mut session = Follow::connect(&addrs, &format!("worker-{id}"), grace);
    while !stop.load(Ordering::SeqCst) {
        let outcome = match session
            .client
            .acquire_timeout("reg", Duration::from_millis(500))
        {
            Ok(Some(guard)) => {
                register.lock().unwrap().enter(id, guard.token());
                thread::sleep(Duration::from_millis(1));
                register.lock().unwrap().leave(id);
                match guard.release() {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            session.resume(&addrs);
            let _ = session.client.bye();
            session = Follow::connect(&addrs, &format!("worker-{id}"), grace);
        }
    }
    let _ = session.client.bye();
}

/// A Jepsen-style run: workers contend for one lock guarding a register
/// while the leader is killed (-9), cut off, cut off one way, stopped
/// (SIGSTOP/SIGCONT) and the links slowed; each fault is healed and the
/// node restarted. No double grant, no stale token, no lost update, and
/// every fault is followed by progress.
#[test]
fn a_guarded_register_stays_linear_under_faults() {
    let mut cluster = TestCluster::start("cluster-checker", 3, 40);
    cluster.leader();
    let addrs: Vec<_> = (1..=3).map(|id| cluster.client_addr(id)).collect();
    let register = Arc::new(Mutex::new(Register::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..3)
        .map(|id| {
            let (addrs, register, stop, done) =
                (addrs.clone(), register.clone(), stop.clone(), done.clone());
            thread::spawn(move || worker(id, addrs, register, stop, done))
        })
        .collect();
    // Progress: 20 more cycles complete within WAIT_MAX.
    let progress = |done: &AtomicU64, what: &str| {
        let from = done.load(Ordering::SeqCst);
        wait_until(&format!("cycles after {what}"), || {
            done.load(Ordering::SeqCst) >= from + 20
        });
    };
    progress(&done, "the start");
    let faults: [&str; 7] = [
        "kill -9",
        "partition",
        "one-way partition",
        "SIGSTOP",
        "SIGSTOP of a follower",
        "kill -9 of a follower",
        "slow links",
    ];
    let mut log = Vec::new();
    for fault in faults {
        let leader = cluster.leader();
        let started = Instant::now();
        let before = done.load(Ordering::SeqCst);
        match fault {
            "kill -9" => {
                cluster.kill(leader);
                cluster.leader();
                cluster.restart(leader);
            }
            "partition" => {
                cluster.isolate(leader);
                cluster.wait_rejoined(leader);
                cluster.heal();
                cluster.leader();
            }
            "one-way partition" => {
                // The leader hears the others; they do not hear it.
                for ((from, _), link) in &cluster.links {
                    if *from == leader {
                        link.block();
                    }
                }
                cluster.wait_rejoined(leader);
                cluster.heal();
            }
            "SIGSTOP" => {
                let process = cluster.nodes[leader as usize - 1].process.as_ref().unwrap();
                signal(process, libc::SIGSTOP);
                wait_until("another leader", || {
                    (1..=3)
                        .filter(|&id| id != leader)
                        .any(|id| this_run(&cluster.stderr(id)).contains("serving as the leader"))
                });
                signal(
                    cluster.nodes[leader as usize - 1].process.as_ref().unwrap(),
                    libc::SIGCONT,
                );
                cluster.wait_rejoined(leader);
            }
            "SIGSTOP of a follower" => {
                // The majority goes on meanwhile: a client of the leader
                // takes and releases locks. (Workers whose connection the
                // frozen node relays are frozen with it, as with a frozen
                // server: their holds keep "reg" until it thaws.)
                let follower = (1..=3).find(|&id| id != leader).unwrap();
                let node = &cluster.nodes[follower as usize - 1];
                signal(node.process.as_ref().unwrap(), libc::SIGSTOP);
                let options = ClientOptions::default();
                let probe = Client::connect(cluster.client_addr(leader), &options).unwrap();
                for i in 0..5 {
                    let guard = probe.acquire(format!("probe-{i}")).unwrap();
                    guard.release().unwrap();
                }
                let node = &cluster.nodes[follower as usize - 1];
                signal(node.process.as_ref().unwrap(), libc::SIGCONT);
            }
            "kill -9 of a follower" => {
                let follower = (1..=3).find(|&id| id != leader).unwrap();
                cluster.kill(follower);
                progress(&done, fault);
                cluster.restart(follower);
            }
            _ => {
                for link in cluster.links.values() {
                    link.delay(Duration::from_millis(20));
                }
                progress(&done, fault);
                cluster.heal();
            }
        }
        progress(&done, fault);
        log.push(format!(
            "{fault}: {} ms to progress, {} cycles",
            started.elapsed().as_millis(),
            done.load(Ordering::SeqCst) - before
        ));
    }
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.join().expect("a worker panicked");
    }
    let register = register.lock().unwrap();
    assert!(register.violations.is_empty(), "{:?}", register.violations);
    // Every write the register took was made under a valid hold; every
    // acknowledged cycle is among them (a cycle whose release went
    // unacknowledged, in a fault, still wrote).
    assert_eq!(register.value, register.history.len() as u64);
    assert!(
        register.value >= done.load(Ordering::SeqCst),
        "no lost update"
    );
    assert!(register.history.windows(2).all(|w| w[0] < w[1]));
    eprintln!(
        "checker: {} cycles, tokens {}..{}; {}",
        register.value,
        register.history.first().unwrap_or(&0),
        register.history.last().unwrap_or(&0),
        log.join("; ")
    );
}

/// A member down while the others log more than a snapshot's worth: the
/// leader compacts its log, so the member catches up from the leader's
/// snapshot; it restarts from that snapshot (its own file) and, made the
/// leader, serves the state intact.
#[test]
fn a_member_that_was_down_catches_up_from_a_snapshot() {
    let mut cluster = TestCluster::start_with(
        "cluster-snapshot",
        3,
        50,
        &["--snapshot-log-bytes", "1048576"],
    );
    let leader = cluster.leader();
    let lagging = (1..=3).find(|&id| id != leader).unwrap();
    let other = (1..=3).find(|&id| id != leader && id != lagging).unwrap();
    cluster.kill(lagging);
    let addrs = cluster.live_clients();
    let mut holder = Follow::connect(&addrs, "holder", Duration::from_secs(60));
    let kept = holder.client.acquire("kept").unwrap();
    let token = kept.token();
    kept.forget();
    // About 2.5 MiB of log: long names taken and released.
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let addrs = addrs.clone();
            thread::spawn(move || {
                let session = Follow::connect(&addrs, &format!("writer-{t}"), Duration::ZERO);
                let long = "x".repeat(1000);
                for i in 0..300 {
                    let guard = session
                        .client
                        .try_acquire(format!("{t}-{i}-{long}"))
                        .unwrap()
                        .expect("free");
                    guard.release().unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("a writer failed");
    }
    wait_until("the leader's snapshot", || {
        cluster.stderr(leader).contains("at log index")
    });
    cluster.restart(lagging);
    wait_until("the snapshot installed", || {
        cluster
            .stderr(lagging)
            .contains("installed the leader's snapshot")
    });
    assert!(cluster
        .stderr(leader)
        .contains(&format!("sending node {lagging} a snapshot")));
    // Restarted, it starts from the snapshot it installed.
    cluster.kill(lagging);
    cluster.restart(lagging);
    // The leader's majority rests on it once the other is cut off: wait
    // until the leader sees it caught up (on a loaded machine the restart
    // can take longer than check-quorum gives a leader without a majority).
    let observer = Client::connect(cluster.client_addr(leader), &ClientOptions::default()).unwrap();
    cluster.wait_caught_up(&observer, lagging);
    // Cut the other follower off, so it falls behind, and stop the
    // leader: it hands over to the member that caught up.
    cluster.isolate(other);
    let guard = match holder.client.acquire("after-the-cut") {
        Ok(guard) => guard,
        Err(e) => panic!(
            "{e}: {}\n---\n{}\n---\n{}",
            cluster.stderr(1),
            cluster.stderr(2),
            cluster.stderr(3)
        ),
    };
    guard.release().unwrap();
    signal(
        cluster.nodes[leader as usize - 1].process.as_ref().unwrap(),
        libc::SIGTERM,
    );
    let (status, log) = cluster.wait_exit(leader);
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("handing leadership to node {lagging}")),
        "{log}"
    );
    // Handed over: the other follower may come back now. (Left cut off,
    // the new leader would have no majority until the old one restarted,
    // and check-quorum could depose it first on a slow machine.)
    cluster.heal();
    cluster.restart(leader);
    // The handed-over member leads: the old leader sent it its vote before
    // it went (`flush_before_exit`; without it, the target, with the other
    // follower cut off, was one vote short).
    let now = cluster.leader();
    assert_eq!(
        now,
        lagging,
        "{}\n---\n{}\n---\n{}",
        cluster.stderr(1),
        cluster.stderr(2),
        cluster.stderr(3)
    );
    let resumed = holder.resume(&[cluster.client_addr(now)]);
    assert_eq!(resumed.holds.len(), 1);
    assert_eq!(
        (resumed.holds[0].name.as_slice(), resumed.holds[0].token),
        (&b"kept"[..], token)
    );
    cluster.heal();
}

/// A leader cut off while its client goes on writing takes the changes
/// (nothing is acknowledged) and writes a snapshot of them — at an index the
/// majority never commits. Deposed, it restarts from its log: the snapshot
/// never became its dump file (it waited for its batches to be committed)
/// and is deleted. Healed, it catches up and, made the leader, serves the
/// majority's history: none of the cut-off changes, the majority's hold.
#[test]
fn a_cut_off_leaders_snapshot_never_becomes_its_state() {
    let mut cluster = TestCluster::start_with(
        "cluster-cut-off-snapshot",
        3,
        120,
        &["--snapshot-log-bytes", "1048576"],
    );
    let leader = cluster.leader();
    let direct = Client::connect(cluster.client_addr(leader), &ClientOptions::default()).unwrap();
    cluster.isolate(leader);
    // About 1.2 MiB of acquires, none of them answered (none committed).
    let long = "y".repeat(1000);
    let pending: Vec<_> = (0..1200)
        .map(|i| {
            direct
                .start_acquire(format!("cut-{i}-{long}"), AcquireOptions::default(), false)
                .unwrap()
        })
        .collect();
    let log = cluster.wait_rejoined(leader);
    let before = &log[..log.rfind(livelock::cluster::node::RESTARTING).unwrap()];
    assert!(
        before.contains("at log index"),
        "the cut-off leader wrote no snapshot: {log}"
    );
    drop(pending);
    let data = cluster.data_dir(leader).to_path_buf();
    let left: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("pending"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let addrs: Vec<_> = (1..=3)
        .filter(|&id| id != leader)
        .map(|id| cluster.client_addr(id))
        .collect();
    // (A grace: the transfer below ends its connection if it is the
    // leader's.)
    let majority = Follow::connect(&addrs, "on-the-majority", Duration::from_secs(60));
    let kept = majority.client.acquire("majority").unwrap();
    let token = kept.token();
    kept.forget();
    cluster.heal();
    cluster.wait_caught_up(&majority.client, leader);
    match majority
        .client
        .cluster_change(&livelock::protocol::ClusterChange::Transfer(leader))
    {
        Ok(()) | Err(Error::Disconnected) => {}
        Err(e) => panic!("transfer: {e}"),
    }
    wait_until("the old leader serving again", || {
        this_run(&cluster.stderr(leader)).contains("serving as the leader")
    });
    let observer = Follow::connect(&[cluster.client_addr(leader)], "observer", Duration::ZERO);
    let seen = observer.client.inspect("majority").unwrap().expect("held");
    assert_eq!(seen.record.holders[0].token, token);
    for i in [0, 599, 1199] {
        let name = format!("cut-{i}-{long}");
        assert!(
            observer.client.inspect(name).unwrap().is_none(),
            "a change the majority never committed is in the state"
        );
    }
}

/// `livelock cluster status`, asked of any member, shows the leader's view
/// (one view: its commit index as of the members' progress):
/// every member, its lag and health; a member that is down turns
/// unreachable. A single server says it is not a cluster.
#[test]
fn cluster_status_shows_the_leaders_view() {
    let mut cluster = TestCluster::start("cluster-status", 3, 60);
    let leader = cluster.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let status = |cluster: &TestCluster, id: u64| -> serde_json::Value {
        let output = livelock_bin()
            .args(["cluster", "status", "--json", "--server"])
            .arg(cluster.client_addr(id).to_string())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let seen = status(&cluster, follower);
    assert_eq!(seen["leader"], leader);
    let members = seen["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for member in members {
        let id = member["id"].as_u64().unwrap();
        assert_eq!(member["client"], cluster.client_addr(id).to_string());
    }
    wait_until("every member replicating and up", || {
        let seen = status(&cluster, leader);
        seen["members"].as_array().unwrap().iter().all(|m| {
            m["healthy"] == true && m["state"] == "replicate" && m["lag"].as_u64() == Some(0)
        })
    });
    // One view: the commit index shown is never ahead of the leader's own
    // log as shown (each status read is itself a quorum round, which moves
    // the commit index past a members' list published before it).
    let client = Client::connect(cluster.client_addr(leader), &ClientOptions::default()).unwrap();
    for _ in 0..5 {
        let reply = client.cluster_status().unwrap();
        let own = reply.members.iter().find(|m| m.id == leader).unwrap();
        assert!(own.matched >= reply.commit, "{reply:?}");
    }
    cluster.kill(follower);
    wait_until("the member that is down seen unreachable", || {
        let seen = status(&cluster, leader);
        seen["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == follower && m["healthy"] == false)
    });
    let text = livelock_bin()
        .args(["cluster", "status", "--server"])
        .arg(cluster.client_addr(leader).to_string())
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains(&format!("leader   node {leader}")), "{text}");
    assert!(text.contains("unreachable"), "{text}");
    // Followers serve metrics too: the cluster's figures, and ready while
    // they know a leader to relay to; the leader says it serves.
    let other = (1..=3).find(|&id| id != leader && id != follower).unwrap();
    let scrape = |id: u64, path: &str| -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(cluster.metrics_addr(id)).unwrap();
        stream.set_read_timeout(Some(WAIT_MAX)).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    let metrics = scrape(other, "/metrics");
    assert!(
        metrics.contains(&format!("livelock_cluster_leader_id {leader}")),
        "{metrics}"
    );
    assert!(
        metrics.contains("livelock_cluster_is_leader 0"),
        "{metrics}"
    );
    assert!(scrape(other, "/health/ready").starts_with("HTTP/1.1 200"));
    let metrics = scrape(leader, "/metrics");
    assert!(
        metrics.contains("livelock_cluster_is_leader 1"),
        "{metrics}"
    );
    // A single server.
    let single = TestServer::start(1);
    let reply = single.client().cluster_status().unwrap();
    assert_eq!((reply.node, reply.members.len()), (0, 0));
}

/// Online membership: a node started with --join is added (`livelock
/// cluster add`), catches up from a snapshot and takes leadership when
/// asked (`cluster transfer`); two founding members are then removed at
/// once (joint consensus) and exit; the hold taken before survives all of
/// it and the two that remain keep serving.
#[test]
fn members_are_added_and_removed_online() {
    let mut cluster = TestCluster::start("cluster-members", 3, 70);
    let first_leader = cluster.leader();
    let addrs = cluster.live_clients();
    let mut holder = Follow::connect(&addrs, "holder", Duration::from_secs(60));
    let guard = holder.client.acquire("kept").unwrap();
    let token = guard.token();
    guard.forget();
    let admin = |cluster: &TestCluster, args: &[&str]| {
        // Every node: the one asked may be the leader that steps down.
        let servers: Vec<String> = (1..=cluster.nodes.len() as u64)
            .map(|id| cluster.client_addr(id).to_string())
            .collect();
        let output = livelock_bin()
            .arg("cluster")
            .args(args)
            .arg("--json")
            .arg("--server")
            .arg(servers.join(","))
            .output()
            .unwrap();
        assert!(output.status.success(), "cluster {args:?}: {output:?}");
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let new = cluster.add_joiner(70);
    let added = format!("{new}={}", cluster.peer_addr_of(new));
    let status = admin(&cluster, &["add", &added]);
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 4, "{status}");
    assert!(members
        .iter()
        .all(|m| m["lag"] == 0 && m["healthy"] == true));
    let status = admin(&cluster, &["transfer", &new.to_string()]);
    assert_eq!(status["leader"], new);
    // The old leader stepped down: it restarts itself as a follower, as
    // any deposed leader.
    cluster.wait_rejoined(first_leader);
    let gone: Vec<u64> = (1..=3).filter(|&id| id != first_leader).collect();
    let remove: Vec<String> = gone.iter().map(u64::to_string).collect();
    let mut args = vec!["remove"];
    args.extend(remove.iter().map(String::as_str));
    let status = admin(&cluster, &args);
    let ids: Vec<u64> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![first_leader, new]);
    for id in gone {
        let (code, log) = cluster.wait_exit(id);
        assert!(code.success(), "{log}");
        assert!(log.contains("removed from the cluster"), "{log}");
    }
    let live = cluster.live_clients();
    let resumed = holder.resume(&live);
    assert_eq!(resumed.holds.len(), 1);
    assert_eq!(resumed.holds[0].token, token);
    let other = holder.client.acquire("after").unwrap();
    assert!(other.token() > 0);
}

/// With --peer-tls-ca the peer links are mutual TLS: the cluster elects a
/// leader and serves, and a peer that speaks plaintext (even with the
/// right secret) is refused.
#[test]
fn peer_links_can_be_tls() {
    use std::io::{Read, Write};
    let certs = ScratchDir::new("cluster-tls-certs");
    let ca = common::certs::Ca::new(&certs, "peers");
    let names = ["127.0.0.1", "127.0.0.81", "127.0.0.82", "127.0.0.83"];
    let (cert, key) = ca.issue(&certs, "node", &names);
    let (cert, key, ca_path) = (
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
        ca.path.to_str().unwrap().to_string(),
    );
    let extra = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--peer-tls-ca",
        &ca_path,
    ];
    let mut cluster = TestCluster::start_with("cluster-tls", 3, 80, &extra);
    let leader = cluster.leader();
    let addrs = cluster.live_clients();
    let client = Follow::connect(&addrs, "over-tls-peers", Duration::ZERO);
    assert!(client.client.try_acquire("x").unwrap().is_some());
    // A plaintext peer with the right secret: the TLS side refuses it.
    let peer = cluster.nodes[leader as usize - 1].peer;
    let mut raw = std::net::TcpStream::connect(peer).unwrap();
    raw.set_read_timeout(Some(WAIT_MAX)).unwrap();
    let mut hello = b"LLPEER\x00\x01".to_vec();
    hello.extend_from_slice(&9u64.to_le_bytes());
    hello.extend_from_slice(&0u16.to_le_bytes());
    let secret = common::cluster::SECRET.as_bytes();
    hello.extend_from_slice(&(secret.len() as u16).to_le_bytes());
    hello.extend_from_slice(secret);
    raw.write_all(&hello).unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    // What came back, if anything, is a TLS alert, not a peer's traffic.
    assert!(rest.is_empty() || rest[0] == 0x15, "{rest:?}");
    wait_until("the refusal logged", || {
        cluster
            .stderr(leader)
            .contains("received corrupt message of type InvalidContentType")
    });
}

/// OPERATIONS.md's backup and restore: a stopped follower's data
/// directory, copied, restores the whole cluster to that moment — the hold
/// taken before it is back (its session resumes), the change made after it
/// is not.
#[test]
fn a_backup_of_one_follower_restores_the_whole_cluster() {
    let mut cluster = TestCluster::start("cluster-backup", 3, 90);
    let leader = cluster.leader();
    let addrs = cluster.live_clients();
    let mut holder = Follow::connect(&addrs, "holder", Duration::from_secs(120));
    let guard = holder.client.acquire("before-backup").unwrap();
    let token = guard.token();
    guard.forget();
    // Back up a follower: stop it (SIGTERM), copy its directory, start it.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    // It has the hold once the leader sees every member caught up.
    wait_until("every member caught up", || {
        let client = Client::connect(cluster.client_addr(leader), &ClientOptions::default());
        client.is_ok_and(|c| {
            c.cluster_status()
                .is_ok_and(|s| s.members.iter().all(|m| m.matched >= s.commit && m.active))
        })
    });
    signal(
        cluster.nodes[follower as usize - 1]
            .process
            .as_ref()
            .unwrap(),
        libc::SIGTERM,
    );
    let (status, _) = cluster.wait_exit(follower);
    assert!(status.success());
    let backup = cluster.dir.join("backup");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(cluster.data_dir(follower))
        .arg(&backup)
        .status()
        .unwrap();
    assert!(copied.success());
    cluster.restart(follower);
    // (Its connection may have gone through the follower's relay.)
    let live = cluster.live_clients();
    holder.resume(&live);
    let later = holder.client.acquire("after-backup").unwrap();
    later.forget();
    // Restore: every node stopped, every directory replaced by the backup.
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        let dir = cluster.data_dir(id).to_path_buf();
        std::fs::remove_dir_all(&dir).unwrap();
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&backup)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(copied.success());
    }
    for id in 1..=3 {
        cluster.restart(id);
    }
    cluster.leader();
    let live = cluster.live_clients();
    let resumed = holder.resume(&live);
    let held: Vec<(Vec<u8>, u64)> = resumed
        .holds
        .iter()
        .map(|h| (h.name.clone(), h.token))
        .collect();
    assert_eq!(held, vec![(b"before-backup".to_vec(), token)]);
}

/// The timer a socket runs, from /proc/net/tcp (`tr`: 0 none, 1
/// retransmit, 2 keepalive, ...), for the connection `local` ↔ `remote`.
fn tcp_timer(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<u8> {
    let hex = |addr: std::net::SocketAddr| match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(ip.octets()),
                addr.port()
            )
        }
        std::net::IpAddr::V6(_) => unreachable!("loopback v4"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
            .then(|| fields.get(5)?.split(':').next()?.parse().ok())
            .flatten()
    })
}

/// A follower's relay finds a vanished client as fast as the leader would:
/// its sockets get the server's keepalive (and user timeout), seen here as
/// the keepalive timer on the relayed connection. And a client that sends
/// its request and half-closes is answered through the relay as the leader
/// answers it directly (the relay drops only a RESUME whose client closed
/// before it was relayed).
#[test]
fn a_relayed_connection_is_like_a_direct_one() {
    use std::io::{Read, Write};
    let mut cluster = TestCluster::start("cluster-keepalive", 3, 100);
    let leader = cluster.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let relayed = std::net::TcpStream::connect(cluster.client_addr(follower)).unwrap();
    let local = relayed.local_addr().unwrap();
    wait_until("the relay's socket keepalive timer", || {
        tcp_timer(cluster.client_addr(follower), local) == Some(2)
    });
    let mut half = std::net::TcpStream::connect(cluster.client_addr(follower)).unwrap();
    half.set_read_timeout(Some(WAIT_MAX)).unwrap();
    let mut hello = Vec::new();
    livelock::protocol::encode_request(
        &mut hello,
        1,
        &livelock::protocol::Request::Hello {
            grace_ms: 0,
            password: b"",
            client_name: b"half-closed",
        },
    );
    half.write_all(&hello).unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    half.read_to_end(&mut answer).unwrap();
    match livelock::protocol::decode_reply(&answer) {
        Ok(livelock::protocol::DecodedReply::Frame { reply, .. }) => {
            assert_eq!(reply.status, livelock::protocol::Status::Ok)
        }
        other => panic!("no answer to a half-closed HELLO: {other:?} ({answer:?})"),
    }
}

/// `livelock run` connected through a follower that freezes (SIGSTOP):
/// its heartbeat goes unanswered, it resumes the session at the next
/// member of its --server list within its grace (its first RESUME, sent
/// to the frozen follower, times out); a library client given the same
/// list opens its session at the next member too. Thawed, the follower
/// finds run's stale RESUME closed by its client and does not relay it
/// (it would take the session from run); COMMAND runs on and ends normally
/// (exit 0, not 79: the lock was never lost).
#[test]
fn run_behind_a_frozen_follower_resumes_at_another_member() {
    let mut cluster = TestCluster::start("cluster-run-frozen", 3, 110);
    let leader = cluster.leader();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let others = (1..=3).filter(|&id| id != follower);
    let servers: Vec<String> = std::iter::once(follower)
        .chain(others)
        .map(|id| cluster.client_addr(id).to_string())
        .collect();
    let dir = ScratchDir::new("cluster-run-frozen-run");
    let (started, go) = (dir.join("started"), dir.join("go"));
    let script = format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.05; done",
        started.display(),
        go.display()
    );
    let mut run = livelock_bin();
    run.args(["run", "--server", &servers.join(","), "--grace", "20s"])
        .args(["guarded", "--", "sh", "-c", &script]);
    let mut child = ChildGuard::spawn("run", &mut run, &dir);
    child.wait_for("COMMAND started", |_| started.exists().then_some(()));
    let frozen = cluster.nodes[follower as usize - 1]
        .process
        .as_ref()
        .unwrap();
    signal(frozen, libc::SIGSTOP);
    let resumed_at = format!("session resumed at {}", servers[1]);
    let resumed = child.wait_for("the resume elsewhere", |c| {
        let text = c.stderr();
        (text.contains("session resumed at") || text.contains("lost")).then_some(text)
    });
    assert!(resumed.contains(&resumed_at), "{resumed}");
    let addrs: Vec<std::net::SocketAddr> = servers.iter().map(|s| s.parse().unwrap()).collect();
    let library = Client::connect(
        &addrs[..],
        &ClientOptions {
            connect_timeout: Duration::from_secs(1),
            ..ClientOptions::default()
        },
    )
    .expect("a session at the next member");
    assert!(library.ping().is_ok());
    let frozen = cluster.nodes[follower as usize - 1]
        .process
        .as_mut()
        .unwrap();
    signal(frozen, libc::SIGCONT);
    frozen.wait_for("the stale RESUME dropped", |p| {
        p.stderr().contains(NOT_RELAYED).then_some(())
    });
    assert!(library.ping().is_ok());
    std::fs::write(&go, b"").unwrap();
    let status = child.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", child.stderr());
    assert!(
        !child.stderr().contains("taking it back"),
        "a stale RESUME took the session: {}",
        child.stderr()
    );
    // Released at the end: the lock is free.
    let addrs = cluster.live_clients();
    let observer = Follow::connect(&addrs, "observer", Duration::ZERO);
    wait_until("the lock released", || {
        observer.client.inspect("guarded").unwrap().is_none()
    });
}
