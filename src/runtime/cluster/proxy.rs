//! A follower's client port: every connection is relayed, byte for byte,
//! to the leader's client port (so a client configured with any one node,
//! the LiveLock client included, reaches the leader; TLS passes through and
//! ends at the leader). Until a leader is known a connection waits (at
//! most `LEADER_WAIT`), then is closed. When this node becomes the leader
//! the proxy stops accepting and hands the listener to the event loops;
//! connections not yet accepted wait in the backlog for them.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::node::NodeStatus;
use super::transport::Directory;
use crate::config::TcpTuning;
use crate::protocol;

/// Relayed connections at a time; more are closed at once.
const RELAYED_MAX: usize = 1024;
/// How long a connection waits for a leader to relay to.
const LEADER_WAIT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// What the relay logs when a RESUME's client went away before it was relayed.
pub const NOT_RELAYED: &str =
    "a RESUME whose client closed the connection before it was relayed; dropped";
/// At most this much of what a client sent before it is relayed is read
/// first (to see whether it is still there).
const EARLY_MAX: usize = 64 << 10;

/// The proxy thread.
pub struct Proxy {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<TcpListener>,
}

impl Proxy {
    /// Starts relaying connections accepted on `listener`.
    pub fn start(
        listener: TcpListener,
        me: u64,
        client_addr: SocketAddr,
        tcp: TcpTuning,
        status: Arc<NodeStatus>,
        directory: Arc<Directory>,
    ) -> io::Result<Proxy> {
        listener.set_nonblocking(true)?;
        // Peers' addresses come with their handshakes; this node's own is here.
        directory.learn(me, client_addr);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("livelock-proxy".into())
            .spawn(move || accept(listener, me, tcp, &status, &directory, &flag))?;
        Ok(Proxy { stop, thread })
    }

    /// Stops accepting and gives the listener back (relayed connections
    /// go on until either side closes).
    pub fn stop(self) -> TcpListener {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the proxy thread does not panic")
    }
}

fn accept(
    listener: TcpListener,
    me: u64,
    tcp: TcpTuning,
    status: &Arc<NodeStatus>,
    directory: &Arc<Directory>,
    stop: &AtomicBool,
) -> TcpListener {
    let relayed = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        // While this node is the leader its loops are about to take the
        // listener: leave new connections in the backlog for them.
        if status.leader.load(Ordering::Relaxed) == me {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => continue,
        };
        if relayed.load(Ordering::SeqCst) >= RELAYED_MAX {
            tracing::warn!("{RELAYED_MAX} connections relayed already; one closed");
            continue;
        }
        relayed.fetch_add(1, Ordering::SeqCst);
        let (status, directory, count) = (status.clone(), directory.clone(), relayed.clone());
        let spawned = thread::Builder::new()
            .name("livelock-relay".into())
            .spawn(move || {
                relay(client, tcp, &status, &directory);
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a relay thread; a connection closed");
        }
    }
    listener
}

/// The leader's client address, once there is a leader (this node's own
/// when it was just elected: the connection waits in the backlog for its
/// loops).
fn leader_addr(status: &NodeStatus, directory: &Directory) -> Option<SocketAddr> {
    let deadline = Instant::now() + LEADER_WAIT;
    while Instant::now() < deadline {
        let leader = status.leader.load(Ordering::Relaxed);
        if leader != 0 {
            if let Some(addr) = directory.client_addr(leader) {
                return Some(addr);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

fn relay(client: TcpStream, tcp: TcpTuning, status: &NodeStatus, directory: &Directory) {
    let _ = client.set_nonblocking(false);
    // A client that vanishes (or a leader) is found as fast as by the
    // leader itself: the relay's sockets get the server's TCP tuning.
    let _ = tcp.apply(&client);
    let Some(addr) = leader_addr(status, directory) else {
        tracing::debug!("no leader to relay a connection to; closed");
        return;
    };
    let Ok(upstream) = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) else {
        tracing::debug!("the leader at {addr} cannot be reached; a connection closed");
        return;
    };
    let _ = tcp.apply(&upstream);
    // A RESUME whose client gave up while this node could not relay it
    // (it was frozen, or waited for a leader) is not relayed: it would
    // take the session from the connection the client made meanwhile
    // elsewhere. (Anything else is: a client may half-close and still
    // read its answers, which the leader gives.)
    let Some(early) = read_early(&client) else {
        return;
    };
    if early.closed && is_resume(&early.bytes) {
        tracing::info!("{NOT_RELAYED}");
        return;
    }
    let early = early.bytes;
    let mut upstream = upstream;
    if upstream.write_all(&early).is_err() {
        return;
    }
    let (Ok(client_read), Ok(upstream_write), Ok(client_end)) =
        (client.try_clone(), upstream.try_clone(), client.try_clone())
    else {
        return;
    };
    let up = thread::Builder::new()
        .name("livelock-relay".into())
        .spawn(move || pipe(client_read, upstream_write));
    pipe(upstream, client);
    // The leader's side ended: so does the client's (a client that keeps
    // its side open would otherwise hold the relay forever).
    let _ = client_end.shutdown(Shutdown::Both);
    if let Ok(up) = up {
        let _ = up.join();
    }
}

/// What a client sent before it was relayed.
struct Early {
    /// At most `EARLY_MAX` bytes.
    bytes: Vec<u8>,
    /// It has closed its side (or its connection failed).
    closed: bool,
}

/// Reads what `client` has sent so far without waiting; None if the
/// socket cannot be switched between modes.
fn read_early(client: &TcpStream) -> Option<Early> {
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    client.set_nonblocking(true).ok()?;
    let closed = loop {
        match (&*client).read(&mut buffer) {
            Ok(0) => break true,
            Ok(n) => {
                bytes.extend_from_slice(&buffer[..n]);
                if bytes.len() >= EARLY_MAX {
                    break false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break true,
        }
    };
    client.set_nonblocking(false).ok()?;
    Some(Early { bytes, closed })
}

/// Whether `bytes` begin with a native RESUME frame (TLS is opaque here).
fn is_resume(bytes: &[u8]) -> bool {
    matches!(
        protocol::decode_request(bytes),
        Ok(protocol::Decoded::Frame { opcode, .. }) if opcode == protocol::opcode::RESUME
    )
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing side
/// (and `from`'s reading side, so the other direction ends too if `to`
/// went away).
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0u8; 16 << 10];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
