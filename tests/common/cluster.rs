//! Real cluster processes on loopback for the cluster tests: each node on
//! its own loopback address (127.0.0.B+i), every peer link (i → j) through
//! a fault-injecting TCP relay inside the test (`Link`: block, delay), and
//! sessions that follow the cluster across failovers (`Follow`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use livelock::client::{Client, ClientOptions, Error};
use livelock::cluster::node::RESTARTING;
use livelock::limits::SECRET_LEN;

use super::{livelock_bin, ChildGuard, ScratchDir, WAIT_MAX};

pub const SECRET: &str = "a cluster secret for tests";

/// A directed peer link's relay: the connections node `from` opens to
/// node `to` (raft messages flow from `from`; TLS handshakes both ways).
pub struct Link {
    pub addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Link {
    pub fn start(target: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a link relay");
        let addr = listener.local_addr().unwrap();
        let blocked = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (b, d, o) = (blocked.clone(), delay_ms.clone(), open.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(inbound) = stream else { continue };
                if b.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                else {
                    continue;
                };
                let mut open = o.lock().unwrap();
                open.retain(|s: &TcpStream| s.peer_addr().is_ok());
                open.push(inbound.try_clone().unwrap());
                open.push(outbound.try_clone().unwrap());
                drop(open);
                // Both ways: raft messages go from the link's owner, but
                // TLS answers back.
                let (back_in, back_out) =
                    (outbound.try_clone().unwrap(), inbound.try_clone().unwrap());
                let (b2, d2) = (b.clone(), d.clone());
                thread::spawn(move || relay(back_in, back_out, &b2, &d2));
                let (b, d) = (b.clone(), d.clone());
                thread::spawn(move || relay(inbound, outbound, &b, &d));
            }
        });
        Link {
            addr,
            blocked,
            delay_ms,
            open,
        }
    }

    /// Cuts the link (open connections and new ones) until `heal`.
    pub fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.blocked.store(false, Ordering::SeqCst);
        self.delay_ms.store(0, Ordering::SeqCst);
    }

    /// Every chunk relayed waits this long first.
    pub fn delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

fn relay(mut from: TcpStream, mut to: TcpStream, blocked: &AtomicBool, delay_ms: &AtomicU64) {
    let mut buffer = [0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            thread::sleep(Duration::from_millis(delay));
        }
        if blocked.load(Ordering::SeqCst) || to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

pub struct Node {
    pub id: u64,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    data: PathBuf,
    pub process: Option<ChildGuard>,
    runs: u32,
}

impl Node {
    /// Node `id` on 127.0.0.(base+id), its data in `dir/node<id>`.
    fn new(dir: &ScratchDir, id: u64, base: u8) -> Node {
        let ip = [127, 0, 0, base + id as u8];
        let data = dir.join(&format!("node{id}"));
        std::fs::create_dir_all(&data).unwrap();
        Node {
            id,
            client: free_port_on(ip),
            peer: free_port_on(ip),
            data,
            process: None,
            runs: 0,
        }
    }
}

/// A cluster of `n` nodes on 127.0.0.(base+1) ..= (base+n).
pub struct TestCluster {
    pub dir: ScratchDir,
    pub nodes: Vec<Node>,
    /// (from, to) → the relay of that direction.
    pub links: BTreeMap<(u64, u64), Link>,
    /// More `livelock server` arguments for every node, and for some.
    extra: Vec<String>,
    extra_for: BTreeMap<u64, Vec<String>>,
}

/// A free port on `ip` (bound and released: the node binds it next).
fn free_port_on(ip: [u8; 4]) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from((ip, 0))).expect("bind a loopback address");
    listener.local_addr().unwrap()
}

impl TestCluster {
    /// Starts `n` nodes (not waiting for a leader).
    pub fn start(label: &str, n: u64, base: u8) -> TestCluster {
        TestCluster::start_with(label, n, base, &[])
    }

    /// Starts `n` nodes with `extra` server arguments.
    pub fn start_with(label: &str, n: u64, base: u8, extra: &[&str]) -> TestCluster {
        let dir = ScratchDir::new(label);
        let nodes: Vec<Node> = (1..=n).map(|id| Node::new(&dir, id, base)).collect();
        let mut links = BTreeMap::new();
        for from in &nodes {
            for to in &nodes {
                if from.id != to.id {
                    links.insert((from.id, to.id), Link::start(to.peer));
                }
            }
        }
        let extra = extra.iter().map(|a| a.to_string()).collect();
        // Every node serves metrics on its own address.
        let extra_for = nodes
            .iter()
            .map(|n| {
                let ip = match n.client.ip() {
                    std::net::IpAddr::V4(ip) => ip.octets(),
                    _ => unreachable!("loopback v4"),
                };
                let metrics = free_port_on(ip).to_string();
                (n.id, vec!["--metrics".to_string(), metrics])
            })
            .collect();
        let mut cluster = TestCluster {
            dir,
            nodes,
            links,
            extra,
            extra_for,
        };
        for id in 1..=n {
            cluster.spawn(id);
        }
        for id in 1..=n {
            cluster.wait_up(id);
        }
        cluster
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    /// A new node that joins (`--join`): its links to and from every node,
    /// started; returns its id. It is a member once `livelock cluster add`
    /// adds it with `peer_addr_of(id)`.
    pub fn add_joiner(&mut self, base: u8) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let node = Node::new(&self.dir, id, base);
        for other in &self.nodes {
            self.links.insert((other.id, id), Link::start(node.peer));
            self.links.insert((id, other.id), Link::start(other.peer));
        }
        self.nodes.push(node);
        self.extra_for.insert(id, vec!["--join".to_string()]);
        self.spawn(id);
        self.wait_up(id);
        id
    }

    /// The address members reach node `id` at once it is added: its own
    /// peer port (a membership change carries one address per member, so
    /// links to an added node bypass the relays).
    pub fn peer_addr_of(&self, id: u64) -> SocketAddr {
        self.nodes[id as usize - 1].peer
    }

    /// Starts node `id` (again), with its peers behind their relays.
    pub fn spawn(&mut self, id: u64) {
        let peers: Vec<String> = self
            .nodes
            .iter()
            .map(|n| match n.id == id {
                true => format!("{}={}", n.id, n.peer),
                false => format!("{}={}", n.id, self.links[&(id, n.id)].addr),
            })
            .collect();
        let peers = peers.join(",");
        let node = &self.nodes[id as usize - 1];
        let mut command = livelock_bin();
        command
            .args(["server", "--threads", "2", "--node-id", &id.to_string()])
            .args(["--peers", &peers, "--listen", &node.client.to_string()])
            // Twice the default: no spurious election on a loaded machine.
            .args(["--election-timeout", "1s"])
            .arg("--data-dir")
            .arg(&node.data)
            .args(&self.extra)
            .args(self.extra_for.get(&id).into_iter().flatten())
            .env("LIVELOCK_CLUSTER_SECRET", SECRET);
        let what = format!("node{id}-run{}", node.runs + 1);
        let process = ChildGuard::spawn(&what, &mut command, &self.dir);
        let node = self.node(id);
        node.runs += 1;
        node.process = Some(process);
    }

    /// Waits until node `id` listens.
    pub fn wait_up(&mut self, id: u64) {
        let process = self.node(id).process.as_mut().expect("started");
        process.wait_for("the node to listen", |p| {
            p.stderr().contains("cluster node listening").then_some(())
        });
    }

    /// Starts node `id` again and waits until it listens.
    pub fn restart(&mut self, id: u64) {
        self.spawn(id);
        self.wait_up(id);
    }

    /// The node that serves as the leader (a running process whose latest
    /// run says so), waiting for one (bounded).
    pub fn leader(&mut self) -> u64 {
        let start = Instant::now();
        loop {
            for node in &mut self.nodes {
                if let Some(process) = &mut node.process {
                    if process.try_wait().is_none()
                        && this_run(&process.stderr()).contains("serving as the leader")
                    {
                        return node.id;
                    }
                }
            }
            if start.elapsed() > WAIT_MAX {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| n.process.as_ref().map(|p| p.stderr()).unwrap_or_default())
                    .collect();
                panic!(
                    "no leader within {WAIT_MAX:?}; the nodes said:\n{}",
                    logs.join("\n---\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL node `id`.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut process) = self.node(id).process.take() {
            process.kill();
        }
    }

    /// Waits (bounded) for node `id` to exit by itself; its status and
    /// what it logged.
    pub fn wait_exit(&mut self, id: u64) -> (std::process::ExitStatus, String) {
        let mut process = self.node(id).process.take().expect("running");
        let status = process.wait_exit();
        (status, process.stderr())
    }

    /// Waits (bounded) until node `id`, a leader deposed, has restarted
    /// itself as a follower — the same process, no exit — and listens
    /// again; what it logged.
    pub fn wait_rejoined(&mut self, id: u64) -> String {
        let process = self.node(id).process.as_mut().expect("running");
        process.wait_for("the deposed leader to restart as a follower", |p| {
            let log = p.stderr();
            let (_, after) = log.rsplit_once(RESTARTING)?;
            after.contains("cluster node listening").then_some(log)
        })
    }

    /// Waits (bounded) until the leader, asked through `client`, counts
    /// member `id` active and holding every entry committed when the wait
    /// began — not the commit index of each reply, which the leader's
    /// timers and these very reads keep moving; on timeout, the last
    /// status and the member's log.
    pub fn wait_caught_up(&self, client: &Client, id: u64) {
        let target = client.cluster_status().expect("a cluster status").commit;
        let started = Instant::now();
        loop {
            let status = client.cluster_status().ok();
            let caught_up = status.as_ref().is_some_and(|s| {
                s.members
                    .iter()
                    .any(|m| m.id == id && m.active && m.matched >= target)
            });
            if caught_up {
                return;
            }
            assert!(
                started.elapsed() < WAIT_MAX,
                "node {id} did not catch up to {target}: {status:?}\n---\n{}",
                self.stderr(id)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Cuts every link to and from node `id`.
    pub fn isolate(&self, id: u64) {
        for ((from, to), link) in &self.links {
            if *from == id || *to == id {
                link.block();
            }
        }
    }

    pub fn heal(&self) {
        for link in self.links.values() {
            link.heal();
        }
    }

    /// Client addresses of the nodes that run.
    pub fn live_clients(&mut self) -> Vec<SocketAddr> {
        self.nodes
            .iter_mut()
            .filter_map(|n| {
                let running = n.process.as_mut().is_some_and(|p| p.try_wait().is_none());
                running.then_some(n.client)
            })
            .collect()
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> &std::path::Path {
        &self.nodes[id as usize - 1].data
    }

    /// Node `id`'s metrics endpoint (`--metrics`).
    pub fn metrics_addr(&self, id: u64) -> SocketAddr {
        self.extra_for[&id][1].parse().expect("a metrics address")
    }

    pub fn client_addr(&self, id: u64) -> SocketAddr {
        self.nodes[id as usize - 1].client
    }

    pub fn stderr(&self, id: u64) -> String {
        self.nodes[id as usize - 1]
            .process
            .as_ref()
            .map(|p| p.stderr())
            .unwrap_or_default()
    }
}

/// A session that follows the cluster: on a lost connection it resumes
/// at the nodes in turn (any node relays to the leader), bounded.
pub struct Follow {
    pub client: Client,
    id: u64,
    secret: [u8; SECRET_LEN],
    options: ClientOptions,
}

impl Follow {
    pub fn connect(addrs: &[SocketAddr], name: &str, grace: Duration) -> Follow {
        let options = ClientOptions {
            client_name: name.into(),
            grace,
            connect_timeout: Duration::from_secs(5),
            ..ClientOptions::default()
        };
        let start = Instant::now();
        loop {
            for addr in addrs {
                if let Ok(client) = Client::connect(addr, &options) {
                    return Follow {
                        id: client.session_id(),
                        secret: client.secret(),
                        client,
                        options,
                    };
                }
            }
            assert!(start.elapsed() < WAIT_MAX, "no node took a session");
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn session_id(&self) -> u64 {
        self.id
    }

    /// Resumes the session at one of `addrs` (tried in turn until one
    /// takes it, at most WAIT_MAX): what it lists.
    pub fn resume(&mut self, addrs: &[SocketAddr]) -> livelock::client::Resumed {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            for addr in addrs {
                match Client::resume(addr, self.id, self.secret, &self.options) {
                    Ok(client) => {
                        let resumed = client.resumed().expect("a resumed client");
                        self.client = client;
                        return resumed;
                    }
                    Err(Error::Status(livelock::protocol::Status::NoSession, message)) => {
                        panic!("session {} is gone: {message}", self.id)
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            assert!(
                start.elapsed() < WAIT_MAX,
                "session {} not resumed within {WAIT_MAX:?}: {last}",
                self.id
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What a node logged since it last restarted itself as a follower.
pub fn this_run(log: &str) -> &str {
    log.rsplit_once(RESTARTING).map_or(log, |(_, after)| after)
}
