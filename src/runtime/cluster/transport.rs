//! Peer links: raft messages between the nodes of a cluster, over TCP —
//! or TLS with `--peer-tls-ca`: each side proves its certificate (the
//! node's `--tls-cert`) against that CA, mutual TLS, before the handshake.
//!
//! Each node listens on its peer address and keeps one outgoing connection
//! to every other node (reconnected as needed). A connection opens with a
//! handshake — magic, the sender's node id, its client address and the
//! cluster secret (compared in constant time; a wrong one closes the
//! connection and is logged) — then carries frames `len u32 LE, raft
//! Message (protobuf)`, each at most `PEER_FRAME_MAX`. Every queue is
//! bounded and drops on overflow (raft resends what is lost); nothing here
//! waits on a peer while holding anything of the raft thread's.

use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use protobuf::Message as _;
use raft::eraftpb::Message;

/// A peer connection's first bytes.
const MAGIC: [u8; 8] = *b"LLPEER\x00\x01";
/// The largest frame: a raft message with a leader's base entry (the whole
/// state) in it.
pub const PEER_FRAME_MAX: usize = 256 << 20;
/// The longest cluster secret, and client address text, in a handshake.
pub const SECRET_LEN_MAX: usize = 1024;
const ADDR_LEN_MAX: usize = 256;
/// Messages queued for one peer, and received from all of them, before
/// more are dropped.
const QUEUE_MAX: usize = 4096;
/// Peer connections accepted and not yet closed.
const INCOMING_MAX: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A handshake must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait between reconnection attempts.
const RECONNECT_WAIT: Duration = Duration::from_millis(100);

/// What the links learned: each node's client address (from its handshake).
#[derive(Debug, Default)]
pub struct Directory {
    clients: Mutex<BTreeMap<u64, SocketAddr>>,
}

impl Directory {
    /// Node `id`'s client address, once it has connected to us.
    pub fn client_addr(&self, id: u64) -> Option<SocketAddr> {
        self.clients
            .lock()
            .expect("directory lock")
            .get(&id)
            .copied()
    }

    pub fn learn(&self, id: u64, addr: SocketAddr) {
        self.clients
            .lock()
            .expect("directory lock")
            .insert(id, addr);
    }
}

/// The outgoing side: one queue per peer.
pub struct Links {
    me: Identity,
    /// Per peer: its address and the queue of its sender thread.
    senders: BTreeMap<u64, (SocketAddr, Sender<Message>)>,
    stop: Arc<AtomicBool>,
}

impl Links {
    /// Queues `message` for its peer; dropped if the queue is full.
    pub fn send(&self, message: Message) {
        if let Some((_, tx)) = self.senders.get(&message.to) {
            match tx.try_send(message) {
                Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    /// Peer `id` is at `addr` (a member added, or moved): a sender thread
    /// for it (the old one, if any, ends).
    pub fn set(&mut self, id: u64, addr: SocketAddr) {
        if id == self.me.node_id || self.senders.get(&id).is_some_and(|(a, _)| *a == addr) {
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_MAX);
        let (me, stop) = (self.me.clone(), self.stop.clone());
        let spawned = thread::Builder::new()
            .name(format!("livelock-peer-{id}"))
            .spawn(move || send_loop(&me, id, addr, &rx, &stop));
        match spawned {
            Ok(_) => {
                self.senders.insert(id, (addr, tx));
            }
            Err(e) => tracing::error!("cannot start the link to node {id}: {e}"),
        }
    }

    /// Peer `id` is no member any more: its sender thread ends.
    pub fn remove(&mut self, id: u64) {
        self.senders.remove(&id);
    }

    /// Every peer's queue is empty (its sender thread took everything).
    pub fn drained(&self) -> bool {
        self.senders.values().all(|(_, tx)| tx.is_empty())
    }

    /// The peers and their addresses.
    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        self.senders
            .iter()
            .map(|(&id, (addr, _))| (id, *addr))
            .collect()
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Wakes the raft thread when a message arrives.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Who this node is to its peers.
#[derive(Clone)]
pub struct Identity {
    pub node_id: u64,
    pub client_addr: SocketAddr,
    pub secret: Arc<Vec<u8>>,
    pub tls: Option<PeerTls>,
}

/// TLS on peer links: this node as a server (peers' certificates checked)
/// and as a client (with its certificate).
#[derive(Clone)]
pub struct PeerTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

/// A peer connection's writing side, TLS or not.
type Out = BufWriter<Box<dyn Write + Send>>;

/// Wraps an outgoing connection to `addr` in TLS if the links use it.
fn outgoing(me: &Identity, addr: SocketAddr, stream: TcpStream) -> Result<Out, String> {
    let stream: Box<dyn Write + Send> = match &me.tls {
        None => Box::new(stream),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let session = rustls::ClientConnection::new(tls.client.clone(), name)
                .map_err(|e| e.to_string())?;
            Box::new(rustls::StreamOwned::new(session, stream))
        }
    };
    Ok(BufWriter::with_capacity(64 << 10, stream))
}

/// Starts the links: a listener on `listener` whose messages go to the
/// returned receiver, and a sender thread per peer in `peers`.
pub fn start(
    me: &Identity,
    listener: TcpListener,
    peers: &BTreeMap<u64, SocketAddr>,
    directory: Arc<Directory>,
    wake: Wake,
) -> std::io::Result<(Links, Receiver<Message>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let (inbox_tx, inbox) = crossbeam_channel::bounded(QUEUE_MAX);
    {
        let me = me.clone();
        let stop = stop.clone();
        thread::Builder::new()
            .name("livelock-peers".into())
            .spawn(move || accept(listener, me, inbox_tx, directory, wake, stop))?;
    }
    let mut links = Links {
        me: me.clone(),
        senders: BTreeMap::new(),
        stop,
    };
    for (&id, &addr) in peers {
        links.set(id, addr);
    }
    Ok((links, inbox))
}

fn handshake(me: &Identity) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&me.node_id.to_le_bytes());
    let addr = me.client_addr.to_string();
    out.extend_from_slice(&(addr.len() as u16).to_le_bytes());
    out.extend_from_slice(addr.as_bytes());
    out.extend_from_slice(&(me.secret.len() as u16).to_le_bytes());
    out.extend_from_slice(&me.secret);
    out
}

/// Keeps a connection to peer `id` and writes its queue to it; what is
/// queued while it cannot connect is dropped.
fn send_loop(me: &Identity, id: u64, addr: SocketAddr, rx: &Receiver<Message>, stop: &AtomicBool) {
    let hello = handshake(me);
    let mut frame = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => stream,
            Err(_) => {
                // Raft resends: what piled up meanwhile is stale. A peer
                // removed (its queue dropped) ends the thread.
                loop {
                    match rx.try_recv() {
                        Ok(_) => {}
                        Err(crossbeam_channel::TryRecvError::Empty) => break,
                        Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                    }
                }
                thread::sleep(RECONNECT_WAIT);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let mut out = match outgoing(me, addr, stream) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!("peer link to node {id} ({addr}): {e}");
                thread::sleep(RECONNECT_WAIT);
                continue;
            }
        };
        // Flushed now: a link that stays idle (between two followers,
        // until an election) must not leave its handshake in the buffer —
        // the peer gives up on it after HANDSHAKE_TIMEOUT and closes, and
        // the first message written later (a vote request) is lost.
        if out.write_all(&hello).and_then(|()| out.flush()).is_err() {
            continue;
        }
        tracing::debug!("peer link to node {id} ({addr}) up");
        loop {
            let message = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(message) => message,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    // An idle link whose peer went (killed, restarted)
                    // is redialled now: else the next message — a vote,
                    // between two followers — is written into it and lost.
                    if peer_closed(fd) {
                        tracing::debug!("peer link to node {id} ({addr}) closed by the peer");
                        break;
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            frame.clear();
            if message.write_to_vec(&mut frame).is_err() || frame.len() > PEER_FRAME_MAX {
                tracing::warn!("a raft message to node {id} could not be framed; dropped");
                continue;
            }
            let written = out
                .write_all(&(frame.len() as u32).to_le_bytes())
                .and_then(|()| out.write_all(&frame))
                .and_then(|()| match rx.is_empty() {
                    true => out.flush(),
                    false => Ok(()),
                });
            if written.is_err() {
                tracing::debug!("peer link to node {id} ({addr}) lost");
                break;
            }
        }
    }
}

/// Whether the peer closed the connection `fd` (we never read it: its
/// end shows as EOF or an error on a non-blocking peek).
fn peer_closed(fd: std::os::fd::RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is the socket of the connection being written (`out`
    // owns it and lives across this call); one byte of our own buffer; a
    // peek with MSG_DONTWAIT neither blocks nor consumes.
    let n = unsafe {
        libc::recv(
            fd,
            std::ptr::addr_of_mut!(byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => {
            let e = std::io::Error::last_os_error().kind();
            !matches!(
                e,
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            )
        }
    }
}

fn accept(
    listener: TcpListener,
    me: Identity,
    inbox: Sender<Message>,
    directory: Arc<Directory>,
    wake: Wake,
    stop: Arc<AtomicBool>,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        if open.load(Ordering::SeqCst) >= INCOMING_MAX {
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let (me, inbox, directory, wake, open) = (
            me.clone(),
            inbox.clone(),
            directory.clone(),
            wake.clone(),
            open.clone(),
        );
        let spawned = thread::Builder::new()
            .name("livelock-peer-in".into())
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                if let Err(why) = receive(stream, &me, &inbox, &directory, &*wake) {
                    tracing::warn!("peer connection from {peer:?} closed: {why}");
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a thread for a peer connection");
        }
    }
}

/// Reads one peer connection: the handshake, then frames into `inbox`.
/// Returns why it ended (a clean close of the peer is not an error).
fn receive(
    tcp: TcpStream,
    me: &Identity,
    inbox: &Sender<Message>,
    directory: &Directory,
    wake: &(dyn Fn() + Send + Sync),
) -> Result<(), String> {
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let control = tcp.try_clone().map_err(|e| e.to_string())?;
    let mut stream: Box<dyn Read> = match &me.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let session =
                rustls::ServerConnection::new(tls.server.clone()).map_err(|e| e.to_string())?;
            Box::new(rustls::StreamOwned::new(session, tcp))
        }
    };
    let mut magic = [0u8; 8];
    stream
        .read_exact(&mut magic)
        .map_err(|e| format!("no handshake ({e})"))?;
    if magic != MAGIC {
        return Err("not a livelock peer (bad magic)".into());
    }
    let from = read_u64(&mut stream)?;
    let addr = read_bytes(&mut stream, ADDR_LEN_MAX)?;
    let secret = read_bytes(&mut stream, SECRET_LEN_MAX)?;
    if !crate::session::secure_eq(&secret, &me.secret) {
        return Err(format!(
            "node {from} sent a wrong cluster secret (authentication failed)"
        ));
    }
    let client_addr: SocketAddr = std::str::from_utf8(&addr)
        .ok()
        .and_then(|a| a.parse().ok())
        .ok_or("a bad client address in the handshake")?;
    directory.learn(from, client_addr);
    // Peers idle between heartbeats; a dead one is found by TCP keepalive
    // on its side and by raft's own timeouts on ours.
    control.set_read_timeout(None).map_err(|e| e.to_string())?;
    let mut reader = std::io::BufReader::with_capacity(64 << 10, stream);
    let mut frame = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match reader.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > PEER_FRAME_MAX {
            return Err(format!("a frame of {len} bytes (at most {PEER_FRAME_MAX})"));
        }
        frame.resize(len, 0);
        reader.read_exact(&mut frame).map_err(|e| e.to_string())?;
        let message = Message::parse_from_bytes(&frame).map_err(|e| e.to_string())?;
        if message.from != from || message.to != me.node_id {
            return Err(format!(
                "a message from {} to {} on node {from}'s link",
                message.from, message.to
            ));
        }
        if frame.capacity() > 1 << 20 {
            frame = Vec::new();
        }
        match inbox.try_send(message) {
            Ok(()) => wake(),
            Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => return Ok(()),
        }
    }
}

fn read_u64(stream: &mut impl Read) -> Result<u64, String> {
    let mut bytes = [0u8; 8];
    stream
        .read_exact(&mut bytes)
        .map_err(|e| format!("short handshake ({e})"))?;
    Ok(u64::from_le_bytes(bytes))
}

fn read_bytes(stream: &mut impl Read, max: usize) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 2];
    stream
        .read_exact(&mut len)
        .map_err(|e| format!("short handshake ({e})"))?;
    let len = u16::from_le_bytes(len) as usize;
    if len > max {
        return Err(format!("a handshake field of {len} bytes (at most {max})"));
    }
    let mut bytes = vec![0u8; len];
    stream
        .read_exact(&mut bytes)
        .map_err(|e| format!("short handshake ({e})"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A link's handshake goes out at once, before any message: a link
    /// that stays idle (two followers) is not closed by its peer for want
    /// of one (the first vote request on it was lost).
    #[test]
    fn the_handshake_is_sent_before_any_message() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let me = Identity {
            node_id: 1,
            client_addr: "127.0.0.1:7873".parse().unwrap(),
            secret: Arc::new(b"secret".to_vec()),
            tls: None,
        };
        let mut links = Links {
            me: me.clone(),
            senders: BTreeMap::new(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        links.set(2, listener.local_addr().unwrap());
        let (mut peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = vec![0u8; handshake(&me).len()];
        peer.read_exact(&mut got).expect("the handshake, unasked");
        assert_eq!(got, handshake(&me));
    }

    /// An idle connection whose peer closed shows as closed; an open one
    /// does not.
    #[test]
    fn a_peer_that_closed_is_seen() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&ours);
        assert!(!peer_closed(fd));
        drop(theirs);
        let start = Instant::now();
        while !peer_closed(fd) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "never seen closed"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}
