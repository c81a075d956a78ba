//! A replicated cluster: the same server on 3 or 5 nodes, one raft group
//! (raft-rs) whose log is the `--durability log` log of every node.
//!
//! A node starts as a follower: its raft thread (`node`) keeps its copy of
//! the log and replays the committed part, and its client port relays every
//! connection to the leader (`proxy`). When it is elected and holds every
//! committed entry, it becomes a server like a single one (`Follower::lead`
//! → `Server::start_leader`): the replayed state restored with every
//! session detached for the failover grace, its base entry proposed first,
//! then the loops' batches, each acknowledged once a majority stores it.
//! Peers talk over `transport` (a cluster secret, bounded frames). See
//! "The cluster" in docs/ARCHITECTURE.md.

pub mod node;
pub mod proxy;
pub mod storage;
pub mod transport;

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

pub use node::{Base, NodeStatus};

use raft::eraftpb::ConfState;

use crate::config::ServerConfig;
use crate::data_dir::{self, DirLock};
use crate::raft_log::{self, LogConfig, LogShared, Store};
use crate::server::Server;

/// The shortest cluster secret accepted.
pub const SECRET_LEN_MIN: usize = 16;
/// The default failover grace (DESIGN.md §5).
pub const FAILOVER_GRACE_DEFAULT: Duration = Duration::from_secs(5);
/// The default election timeout: a follower stands after 0.5 to 1 s
/// without a leader's word; a leader without a quorum steps down as soon.
pub const ELECTION_TIMEOUT_DEFAULT: Duration = Duration::from_millis(500);

/// This node's place in its cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: u64,
    /// Every member's peer address, this node's included.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Every peer connection proves it knows this.
    pub secret: Vec<u8>,
    /// After a failover, sessions wait at least this long for their clients.
    pub failover_grace: Duration,
    /// Raft's election timeout (randomised up to twice this).
    pub election_timeout: Duration,
    /// A new member: it starts with no membership and waits to be added
    /// (`livelock cluster add`), instead of founding a cluster.
    pub join: bool,
    /// TLS on peer links: peers' certificates must chain to this CA (each
    /// node shows its `--tls-cert`).
    pub peer_tls_ca: Option<std::path::PathBuf>,
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.peers.contains_key(&self.node_id) {
            return Err(format!(
                "--node-id {} is not one of --peers ({})",
                self.node_id,
                self.peers
                    .keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if self.election_timeout < 3 * node::TICK || self.election_timeout > Duration::from_secs(60)
        {
            return Err(format!(
                "--election-timeout is from {} ms to 60 s",
                3 * node::TICK.as_millis()
            ));
        }
        if self.secret.len() < SECRET_LEN_MIN || self.secret.len() > transport::SECRET_LEN_MAX {
            return Err(format!(
                "the cluster secret (LIVELOCK_CLUSTER_SECRET) must have {SECRET_LEN_MIN} to {} bytes",
                transport::SECRET_LEN_MAX
            ));
        }
        Ok(())
    }
}

/// `ID=HOST:PORT,...` (ids ≥ 1, each once) as a map.
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, SocketAddr>, String> {
    let mut peers = BTreeMap::new();
    for one in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = |why: &str| format!("{one:?} is not a peer ({why}; e.g. 1=10.0.0.1:7874)");
        let (id, addr) = one.split_once('=').ok_or_else(|| bad("no ID="))?;
        let id: u64 = match id.trim().parse() {
            Ok(id) if id >= 1 => id,
            _ => return Err(bad("the id is a number from 1")),
        };
        let addr = addr
            .trim()
            .to_socket_addrs()
            .map_err(|e| bad(&e.to_string()))?
            .next()
            .ok_or_else(|| bad("the host has no address"))?;
        if peers.insert(id, addr).is_some() {
            return Err(bad("the id is listed twice"));
        }
    }
    if peers.is_empty() {
        return Err("--peers lists no node".into());
    }
    Ok(peers)
}

/// A node that does not lead (yet): its raft thread runs, its client port
/// relays to the leader.
pub struct Follower {
    config: ServerConfig,
    dir_lock: DirLock,
    node: node::NodeHandle,
    proxy: proxy::Proxy,
    log: Arc<LogShared>,
    /// The metrics endpoint while following (the leader's server binds
    /// its own).
    metrics: Option<(
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
}

/// Takes the data directory, binds the client and peer ports, opens the
/// log, and starts the raft thread and the peer links.
pub fn start(config: ServerConfig) -> io::Result<Follower> {
    let cluster = config
        .cluster
        .clone()
        .ok_or_else(|| io::Error::other("not a cluster node"))?;
    cluster.validate().map_err(io::Error::other)?;
    let dir_lock = data_dir::lock(&config.data_dir, config.takeover_wait)?;
    let listener = crate::server::bind(config.listen, config.takeover_wait)?;
    let peer_addr = cluster.peers[&cluster.node_id];
    let peer_listener = crate::server::bind(peer_addr, config.takeover_wait)?;
    peer_listener.set_nonblocking(false)?;
    let (engine, hard_state) = raft_log::open(&config.data_dir)
        .map_err(|e| io::Error::other(format!("cannot start: {e}")))?;
    let log_config = LogConfig {
        data_dir: config.data_dir.clone(),
        snapshot_log_bytes: config.snapshot_log_bytes,
        fault_fail_file: config.fault_log_fail_file.clone(),
    };
    let store = Store::new(engine, &log_config);
    // The membership: as stored (changes made while running), else the
    // `--peers` list (a new cluster) — or none, for a node that joins and
    // waits to be added. Addresses given now win (a member moved).
    let (conf_state, members) = match store.membership().map_err(io::Error::other)? {
        Some((conf_state, mut members)) => {
            members.extend(cluster.peers.iter().map(|(&id, &addr)| (id, addr)));
            (conf_state, members)
        }
        None if cluster.join => (ConfState::default(), cluster.peers.clone()),
        None => {
            // A founding member: the cluster's first snapshot (index 1,
            // term 1, no state) and its first members, the same on every
            // founding node, so that a member added later is sent a
            // snapshot that says who the members were.
            let voters: Vec<u64> = cluster.peers.keys().copied().collect();
            let conf_state = ConfState::from((voters, vec![]));
            if own_snapshot(&config)?.is_none() {
                let empty = (Default::default(), Default::default());
                let founding = crate::snapshot::log_snapshot(vec![empty], 1, 1);
                data_dir::write_atomic(&config.dump_path(), &crate::dump::encode(&founding))?;
            }
            store
                .put_membership(&conf_state, &cluster.peers)
                .map_err(io::Error::other)?;
            (conf_state, cluster.peers.clone())
        }
    };
    let (log, parts) = LogShared::new();
    log.read_barriers
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let directory = Arc::new(transport::Directory::default());
    let client_addr = advertised(listener.local_addr()?, peer_addr);
    let me = transport::Identity {
        node_id: cluster.node_id,
        client_addr,
        secret: Arc::new(cluster.secret.clone()),
        tls: peer_tls(&config, &cluster).map_err(io::Error::other)?,
    };
    let wake = log.clone();
    let (links, inbox) = transport::start(
        &me,
        peer_listener,
        &members,
        directory.clone(),
        Arc::new(move || wake.wake()),
    )?;
    let node = node::start(node::NodeStart {
        id: cluster.node_id,
        conf_state,
        members,
        store,
        hard_state,
        snapshot: own_snapshot(&config)?,
        data_dir: config.data_dir.clone(),
        snapshot_log_bytes: config.snapshot_log_bytes,
        election_timeout: cluster.election_timeout,
        log: log.clone(),
        parts,
        links,
        inbox,
        directory: directory.clone(),
    })
    .map_err(io::Error::other)?;
    let listener_addr = listener.local_addr()?;
    let proxy = proxy::Proxy::start(
        listener,
        cluster.node_id,
        client_addr,
        config.tcp,
        node.status.clone(),
        directory,
    )?;
    let metrics = match config.metrics_listen {
        Some(addr) => Some(follower_metrics(addr, log.clone(), node.status.clone())?),
        None => None,
    };
    tracing::info!(
        node = cluster.node_id,
        "cluster node listening on {} (clients) and {peer_addr} (peers); {} member(s)",
        listener_addr,
        cluster.peers.len()
    );
    Ok(Follower {
        config,
        dir_lock,
        node,
        proxy,
        log,
        metrics,
    })
}

/// A follower's metrics endpoint: the log's and the cluster's figures;
/// ready while it knows a leader to relay to.
fn follower_metrics(
    addr: SocketAddr,
    log: Arc<LogShared>,
    status: Arc<NodeStatus>,
) -> io::Result<(
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
)> {
    let listener = std::net::TcpListener::bind(addr)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics = crate::metrics::ServerMetrics::new()
        .with_log(Some(log))
        .with_cluster(Some(status.clone()));
    let clock = crate::event_loop::Clock::new();
    let ready: crate::metrics::Readiness =
        Box::new(
            move || match status.leader.load(std::sync::atomic::Ordering::Relaxed) {
                0 => Some("no leader known to relay to"),
                _ => None,
            },
        );
    let thread = crate::metrics::serve(
        listener,
        Vec::new(),
        Arc::new(metrics),
        move || clock.now_ms(),
        ready,
        stop.clone(),
    )?;
    Ok((stop, thread))
}

/// What followers relay to: the client port at an address peers reach
/// (the peer address's host when it listens on every interface).
fn advertised(client: SocketAddr, peer: SocketAddr) -> SocketAddr {
    match client.ip().is_unspecified() {
        true => SocketAddr::new(peer.ip(), client.port()),
        false => client,
    }
}

/// The TLS setup of the peer links, with `--peer-tls-ca`: this node's
/// certificate both ways, peers' checked against the CA.
fn peer_tls(
    config: &ServerConfig,
    cluster: &ClusterConfig,
) -> Result<Option<transport::PeerTls>, String> {
    let Some(ca) = &cluster.peer_tls_ca else {
        return Ok(None);
    };
    let Some(files) = &config.tls else {
        return Err(
            "--peer-tls-ca needs --tls-cert and --tls-key (this node's certificate)".into(),
        );
    };
    let server = crate::tls::server_config(&crate::tls::TlsFiles {
        client_ca: Some(ca.clone()),
        required: true,
        ..files.clone()
    })?;
    // (The name each connection checks is the peer's address.)
    let client = crate::client::TlsClient::new(ca, "localhost", Some((&files.cert, &files.key)))?;
    Ok(Some(transport::PeerTls {
        server,
        client: client.config(),
    }))
}

/// The node's last snapshot of the log (its dump file), if it has one.
fn own_snapshot(config: &ServerConfig) -> io::Result<Option<crate::dump::Dump>> {
    let path = config.dump_path();
    match data_dir::load_dump(&path) {
        Ok(Some(state)) if state.log.is_some() => Ok(Some(state)),
        Ok(Some(_)) => Err(io::Error::other(format!(
            "{} is not a snapshot of a cluster's log (a single server's dump?): \
             a cluster node starts from its log only",
            path.display()
        ))),
        Ok(None) => Ok(None),
        Err(e) => Err(io::Error::other(format!(
            "cannot read the snapshot {}: {e}",
            path.display()
        ))),
    }
}

impl Follower {
    /// What asks the node to stop (SIGTERM): a leader hands over first.
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let stop = self.node.stopper();
        move || stop()
    }

    /// The node's view of the cluster.
    pub fn status(&self) -> Arc<NodeStatus> {
        self.node.status.clone()
    }

    /// Waits until this node is elected and holds every committed change,
    /// then serves: the client port goes from the relay to the loops.
    pub fn lead(self) -> io::Result<Server> {
        let node::Event::Promoted { state } = self
            .node
            .events
            .recv()
            .map_err(|_| io::Error::other("the raft thread ended"))?;
        let listener = self.proxy.stop();
        // The server's endpoint takes the metrics address over.
        if let Some((stop, thread)) = self.metrics {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = thread.join();
        }
        // (The raft thread runs for the rest of the process.)
        let serve = self.node.server_hook();
        Server::start_leader(
            self.config,
            self.dir_lock,
            listener,
            state,
            (self.log, self.node.status.clone()),
            serve,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_parsed_and_checked() {
        let peers = parse_peers("1=127.0.0.1:7874, 2=127.0.0.2:7874").unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[&2], "127.0.0.2:7874".parse().unwrap());
        for bad in [
            "",
            "1",
            "0=127.0.0.1:1",
            "x=127.0.0.1:1",
            "1=127.0.0.1:1,1=127.0.0.2:1",
        ] {
            assert!(parse_peers(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_node_listening_everywhere_advertises_its_peer_host() {
        let peer: SocketAddr = "10.0.0.2:7874".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7873".parse().unwrap();
        assert_eq!(advertised(any, peer), "10.0.0.2:7873".parse().unwrap());
        let one: SocketAddr = "127.0.0.5:7873".parse().unwrap();
        assert_eq!(advertised(one, peer), one);
    }
}
