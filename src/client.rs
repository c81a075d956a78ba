//! A blocking Rust client for the native protocol.
//!
//! One TCP connection per [`Client`]; any number of threads may use it at
//! once (requests are pipelined and matched by request id). A reader thread
//! takes every frame off the socket: replies go to the caller waiting for
//! them, pushes (lock lost, shutdown, session taken) to [`Client::events`].
//! That queue is bounded: signals beyond `EVENTS_MAX` unread are dropped and
//! counted; the other events are never dropped (they have reserved room,
//! `EVENTS_RESERVED`, and past it the reader waits for the application).
//! The socket has keepalive and TCP_USER_TIMEOUT, as the server's have.
//!
//! ```no_run
//! use livelock::client::{Client, ClientOptions};
//! let client = Client::connect("127.0.0.1:7873", &ClientOptions::default())?;
//! let guard = client.acquire("report-42")?; // waits in FIFO order
//! println!("fencing token {}", guard.token());
//! drop(guard); // releases
//! # Ok::<(), livelock::client::Error>(())
//! ```

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hashbrown::HashMap;
use parking_lot::Mutex;

use crate::protocol::{
    self, flags, opcode, DecodedReply, Mode, Request, SignalKind, Status, HEADER_LEN, SECRET_LEN,
    WAIT_FOREVER,
};
pub use crate::protocol::{Inspection, Listing, LockRecord, StatsReply as ServerStats, Waiting};

#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// The server answered with this status (and message).
    Status(Status, String),
    /// The server sent something this client does not understand.
    Protocol(String),
    /// The connection is gone.
    Disconnected,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Status(status, message) if message.is_empty() => {
                write!(f, "{}", status.as_str())
            }
            Error::Status(status, message) => write!(f, "{}: {message}", status.as_str()),
            Error::Protocol(what) => write!(f, "protocol error: {what}"),
            Error::Disconnected => write!(f, "disconnected from the server"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Signals kept unread for the application; later ones are dropped (and
/// counted, [`Client::signals_dropped`]) until it reads some.
pub const EVENTS_MAX: usize = 4096;

/// Room in the events queue kept for the events that are never dropped (lock
/// lost, shutdown, session taken, disconnected): signals may only fill
/// `EVENTS_MAX` of it. The server sends at most one LOCK_LOST per hold and one
/// SHUTDOWN / SESSION_TAKEN / Disconnected per connection; should an
/// application leave more than this unread, the reader waits for it
/// (backpressure on the connection) rather than drop one.
pub const EVENTS_RESERVED: usize = 1024;

/// The queue's bound: `EVENTS_MAX` signals plus the reserved room.
pub(crate) const EVENTS_QUEUE_MAX: usize = EVENTS_MAX + EVENTS_RESERVED;
const _: () = assert!(
    EVENTS_RESERVED >= 3,
    "room for shutdown, session taken, disconnected"
);

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub password: Option<String>,
    pub client_name: String,
    /// How long the server keeps the session's holds after the connection
    /// is lost, waiting for a RESUME. Zero: released at once.
    pub grace: Duration,
    pub connect_timeout: Duration,
    /// Speak TLS to the server (feature `tls`).
    #[cfg(feature = "tls")]
    pub tls: Option<TlsClient>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            password: None,
            client_name: format!("{}:{}", hostname(), std::process::id()),
            grace: Duration::ZERO,
            connect_timeout: Duration::from_secs(10),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// How to reach a server over TLS: whom to trust, the name its
/// certificate must carry, and optionally this client's certificate.
#[cfg(feature = "tls")]
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    server_name: rustls::pki_types::ServerName<'static>,
}

#[cfg(feature = "tls")]
impl TlsClient {
    /// Trusts the CA certificates in `ca_file` (PEM) for a server whose
    /// certificate names `server_name` (a DNS name or an IP address); with
    /// `client_cert` (certificate chain, key; PEM files), proves who this
    /// client is to a server that asks (mutual TLS).
    pub fn new(
        ca_file: &std::path::Path,
        server_name: &str,
        client_cert: Option<(&std::path::Path, &std::path::Path)>,
    ) -> std::result::Result<TlsClient, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let pem = |what: &str, path: &std::path::Path, e: &dyn fmt::Display| {
            format!("TLS {what} {}: {e}", path.display())
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| pem("CA", ca_file, &e))? {
            let cert = cert.map_err(|e| pem("CA", ca_file, &e))?;
            roots.add(cert).map_err(|e| pem("CA", ca_file, &e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let config = match client_cert {
            Some((cert_file, key_file)) => {
                let certs = CertificateDer::pem_file_iter(cert_file)
                    .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| pem("certificate", cert_file, &e))?;
                let key =
                    PrivateKeyDer::from_pem_file(key_file).map_err(|e| pem("key", key_file, &e))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("TLS client certificate: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("TLS server name {server_name:?}: {e}"))?;
        Ok(TlsClient {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The rustls setup (the async client hands it to tokio-rustls).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// The name the server's certificate must carry.
    pub fn server_name(&self) -> rustls::pki_types::ServerName<'static> {
        self.server_name.clone()
    }

    /// A new TLS client session for one connection (the load generator
    /// drives it over its own sockets).
    pub fn session(&self) -> std::result::Result<rustls::ClientConnection, rustls::Error> {
        rustls::ClientConnection::new(self.config(), self.server_name())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// How to acquire.
#[derive(Debug, Clone, Copy)]
pub struct AcquireOptions {
    pub mode: Mode,
    /// `Some(ZERO)`: try once. `Some(d)`: wait at most d. `None`: wait forever.
    pub wait: Option<Duration>,
    /// The hold ends unless extended within this time.
    pub lease: Option<Duration>,
    /// `Mode::Permits`: how many permits (1..=capacity); ignored otherwise.
    pub weight: u32,
    /// `Mode::Permits`: the semaphore's capacity; ignored otherwise.
    pub capacity: u32,
}

impl Default for AcquireOptions {
    fn default() -> Self {
        AcquireOptions {
            mode: Mode::Exclusive,
            wait: None,
            lease: None,
            weight: 1,
            capacity: 0,
        }
    }
}

/// Server-initiated events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The lease of this hold ran out; the lock is no longer held.
    LockLost { name: Vec<u8>, token: u64 },
    /// The server is shutting down.
    Shutdown,
    /// Another connection resumed this session.
    SessionTaken,
    /// Someone raised `signal` on `name`, which this session holds.
    Signal { name: Vec<u8>, signal: Vec<u8> },
    /// The connection is gone (the session may be resumable within its grace).
    Disconnected,
}

/// What a RESUME found on the server: the session's requests still in
/// flight (their replies will come, as pushes, on this connection) and
/// every lock it holds. A request of the old connection that is in neither
/// was answered: replies the old connection had not sent arrive (as pushes)
/// right after the RESUME; a hold not listed is gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resumed {
    pub in_flight: Vec<u32>,
    pub holds: Vec<HeldLock>,
}

/// A lock a resumed session holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLock {
    pub name: Vec<u8>,
    pub mode: Mode,
    /// The fencing token it was granted with.
    pub token: u64,
}

/// A reply taken off the socket.
#[derive(Debug)]
pub(crate) struct OwnedReply {
    pub(crate) flags: u16,
    pub(crate) status: Status,
    pub(crate) body: Vec<u8>,
}

/// A request waiting for its final reply: where it goes, and for an
/// ACQUIRE the lock's name (a grant nobody waits for any more — its
/// `PendingAcquire` was dropped — is released at once).
struct Waiter {
    tx: Sender<OwnedReply>,
    acquire: Option<Vec<u8>>,
}

struct Inner {
    wire: Arc<Wire>,
    /// Callers waiting for a reply, by request id. None once disconnected.
    waiting: Mutex<Option<HashMap<u32, Waiter>>>,
    next_id: AtomicU32,
    session_id: u64,
    secret: [u8; SECRET_LEN],
    grace_ms: u32,
    /// Signals dropped because `EVENTS_MAX` of them were unread.
    signals_dropped: AtomicU64,
    /// After a RESUME: what the server listed (holds complete once
    /// `listed` has fired).
    resumed: Mutex<Option<Resumed>>,
}

pub struct Client {
    inner: Arc<Inner>,
    events: Receiver<Event>,
}

impl Client {
    /// Connects and opens a new session.
    pub fn connect(addr: impl ToSocketAddrs, options: &ClientOptions) -> Result<Client> {
        let password = options.password.as_deref().unwrap_or("").as_bytes();
        let grace_ms = u32::try_from(options.grace.as_millis()).unwrap_or(u32::MAX);
        let hello = Request::Hello {
            grace_ms,
            password,
            client_name: options.client_name.as_bytes(),
        };
        Client::open(addr, options, &hello).map(|(client, _)| client)
    }

    /// Connects and takes back the session `session_id` (within its grace).
    pub fn resume(
        addr: impl ToSocketAddrs,
        session_id: u64,
        secret: [u8; SECRET_LEN],
        options: &ClientOptions,
    ) -> Result<Client> {
        let password = options.password.as_deref().unwrap_or("").as_bytes();
        let resume = Request::Resume {
            session_id,
            secret,
            password,
        };
        let (client, listed) = Client::open(addr, options, &resume)?;
        // The server lists the session's holds right after the reply.
        match listed.recv_timeout(options.connect_timeout) {
            Ok(()) => Ok(client),
            Err(_) => Err(Error::Protocol("the listing of holds did not end".into())),
        }
    }

    /// After [`Client::resume`]: the session's requests still in flight and
    /// the locks it holds, as the server listed them.
    pub fn resumed(&self) -> Option<Resumed> {
        self.inner.resumed.lock().clone()
    }

    /// Connects and sends `first` (HELLO or RESUME) to each address in
    /// turn until one answers (a cluster's members: any one relays to the
    /// leader, so one that is down, frozen or slower than
    /// `connect_timeout` is passed over; a server's refusal is final);
    /// also returns what fires when a RESUME's listing of holds is complete.
    fn open(
        addr: impl ToSocketAddrs,
        options: &ClientOptions,
        first: &Request<'_>,
    ) -> Result<(Client, Receiver<()>)> {
        let mut last = Error::Io(io::Error::new(
            io::ErrorKind::NotFound,
            "no address to connect to",
        ));
        for addr in addr.to_socket_addrs()? {
            match Client::open_at(addr, options, first) {
                Ok(opened) => return Ok(opened),
                Err(e @ Error::Status(..)) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn open_at(
        addr: SocketAddr,
        options: &ClientOptions,
        first: &Request<'_>,
    ) -> Result<(Client, Receiver<()>)> {
        let timeout = options.connect_timeout;
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        set_dead_peer_detection(&stream)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let wire = Arc::new(Wire::open(&mut stream, options)?);
        let mut frame = Vec::new();
        protocol::encode_request(&mut frame, 1, first);
        wire.write_all(&frame)?;
        let mut reader = WireReader {
            raw: stream.try_clone()?,
            #[cfg(feature = "tls")]
            wire: wire.clone(),
        };
        let mut buf = Vec::new();
        let reply = read_frame(&mut reader, &mut buf)?.ok_or(Error::Disconnected)?;
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        if reply.status != Status::Ok {
            return Err(status_error(reply.status, &reply.body));
        }
        let (session_id, secret, grace_ms) = protocol::parse_session_body(&reply.body)
            .ok_or_else(|| Error::Protocol("short session reply".into()))?;
        let resumed = match first {
            Request::Resume { .. } => Some(Resumed {
                in_flight: protocol::parse_resumed_in_flight(&reply.body)
                    .ok_or_else(|| Error::Protocol("bad RESUME reply".into()))?,
                holds: Vec::new(),
            }),
            _ => None,
        };
        let (listed_tx, listed) = crossbeam_channel::bounded(1);

        let (events_tx, events) = crossbeam_channel::bounded(EVENTS_QUEUE_MAX);
        let inner = Arc::new(Inner {
            wire,
            waiting: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU32::new(first_request_id(first)),
            session_id,
            secret,
            grace_ms,
            signals_dropped: AtomicU64::new(0),
            resumed: Mutex::new(resumed),
        });
        let for_reader = inner.clone();
        std::thread::Builder::new()
            .name("livelock-client".into())
            .spawn(move || read_loop(reader, buf, for_reader, events_tx, listed_tx))?;
        Ok((Client { inner, events }, listed))
    }

    pub fn session_id(&self) -> u64 {
        self.inner.session_id
    }

    /// The secret RESUME needs, with `session_id`.
    pub fn secret(&self) -> [u8; SECRET_LEN] {
        self.inner.secret
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(u64::from(self.inner.grace_ms))
    }

    /// Pushed events: lock lost, signal, shutdown, session taken, disconnected.
    /// Only signals are ever dropped (past `EVENTS_MAX` unread ones).
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// How many signals were dropped because `EVENTS_MAX` were unread.
    pub fn signals_dropped(&self) -> u64 {
        self.inner.signals_dropped.load(Ordering::Relaxed)
    }

    /// Waits (forever, FIFO) for an exclusive hold.
    pub fn acquire(&self, name: impl AsRef<[u8]>) -> Result<Guard> {
        self.acquire_with(name, AcquireOptions::default())
    }

    /// One attempt: `None` if someone else holds it.
    pub fn try_acquire(&self, name: impl AsRef<[u8]>) -> Result<Option<Guard>> {
        self.acquire_timeout(name, Duration::ZERO)
    }

    /// Waits at most `wait`: `None` if not granted in time.
    pub fn acquire_timeout(&self, name: impl AsRef<[u8]>, wait: Duration) -> Result<Option<Guard>> {
        let options = AcquireOptions {
            wait: Some(wait),
            ..AcquireOptions::default()
        };
        match self.acquire_with(name, options) {
            Ok(guard) => Ok(Some(guard)),
            Err(Error::Status(Status::Busy | Status::TimedOut, _)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits (forever) for a shared hold.
    pub fn acquire_shared(&self, name: impl AsRef<[u8]>) -> Result<Guard> {
        let options = AcquireOptions {
            mode: Mode::Shared,
            ..AcquireOptions::default()
        };
        self.acquire_with(name, options)
    }

    /// Takes every name at once, each exclusive or shared, or none:
    /// one guard per name (in `names`' order, each with its own fencing
    /// token), once all are held. The server takes them in byte order as
    /// ordinary FIFO acquires and gives back what it took if one fails, so
    /// this session never holds a part of the set, and no two such
    /// requests can deadlock each other. `wait`: `None` forever, else at
    /// most that long (`ZERO`: one try); `Ok(None)` if not granted in time.
    pub fn acquire_all<N: AsRef<[u8]>>(
        &self,
        names: &[(N, Mode)],
        wait: Option<Duration>,
    ) -> Result<Option<Vec<Guard>>> {
        let (count, bytes) = all_names(names)?;
        let request = all_request(count, &bytes, wait)?;
        let granted = all_granted(names, self.call(&request))?;
        let guard = |(name, token)| Guard {
            inner: self.inner.clone(),
            name,
            token,
            armed: true,
        };
        Ok(granted.map(|all| all.into_iter().map(guard).collect()))
    }

    /// Takes, for every requirement, `need` of its candidates that match
    /// its tag filter — all requirements at once, or none ("K of these
    /// N", resource pools). Each requirement with more matching candidates
    /// than it needs waits in its pool's FIFO queue (a counting semaphore
    /// of the server's, named after the candidates); then the server takes
    /// free candidates in byte order. The grant says which candidates
    /// each requirement got, each with its own guard and fencing token;
    /// dropping the grant releases the resources, then the queue's
    /// permits. `wait`: `None` forever, else at most that long (`ZERO`:
    /// one try); `Ok(None)` if not granted in time. A requirement whose
    /// filter leaves too few candidates is `Error::Status(OverCapacity)`.
    pub fn acquire_pool(
        &self,
        requirements: &[Requirement],
        wait: Option<Duration>,
    ) -> Result<Option<PoolGrant>> {
        let (count, bytes) = pool_spec(requirements)?;
        let request = pool_request(count, &bytes, wait)?;
        let granted = pool_granted(requirements, self.call(&request))?;
        let guard = |(name, token)| Guard {
            inner: self.inner.clone(),
            name,
            token,
            armed: true,
        };
        Ok(granted.map(|grants| {
            let mut resources = Vec::new();
            let mut permits = Vec::new();
            for grant in grants {
                resources.push(grant.resources.into_iter().map(guard).collect());
                permits.extend(grant.permits.map(guard));
            }
            PoolGrant { resources, permits }
        }))
    }

    /// Declares the order this session's acquires keep from now on
    /// (`None`: none): an acquire of a name that does not rank after every
    /// name the session holds or waits for is then refused
    /// `OrderViolation`, so sessions that keep one order cannot deadlock
    /// each other. Declared before taking locks (else `OrderViolation`);
    /// it lasts as long as the session, across RESUME and restarts.
    pub fn set_order(&self, order: Option<&crate::order::Order>) -> Result<()> {
        let mut body = Vec::new();
        crate::order::Order::encode(order, &mut body);
        self.call(&Request::SetOrder(&body)).map(|_| ())
    }

    /// The counting semaphore `name` of `capacity` permits (the capacity
    /// is the name's while it is in use: every acquire must name the same,
    /// or is refused `CapacityConflict`; `Semaphore::set_capacity` changes
    /// it). Permits are held like locks: released with the guard, or the
    /// moment the session ends.
    pub fn semaphore(&self, name: impl AsRef<[u8]>, capacity: u32) -> Semaphore<'_> {
        Semaphore {
            client: self,
            name: name.as_ref().to_vec(),
            capacity,
        }
    }

    /// Acquires as `options` say; a refusal is `Error::Status(Busy | TimedOut | ...)`.
    pub fn acquire_with(&self, name: impl AsRef<[u8]>, options: AcquireOptions) -> Result<Guard> {
        self.start_acquire(name, options, false)?.wait()
    }

    /// Sends an acquire and returns at once; wait for it with
    /// [`PendingAcquire::wait`], or withdraw it with [`PendingAcquire::cancel`].
    /// `notify_queued`: the server says when the acquire has to queue
    /// ([`PendingAcquire::wait_queued`]).
    pub fn start_acquire(
        &self,
        name: impl AsRef<[u8]>,
        options: AcquireOptions,
        notify_queued: bool,
    ) -> Result<PendingAcquire> {
        let name = name.as_ref();
        let request = acquire_request(name, options, notify_queued);
        let (request_id, replies) = self.send(&request)?;
        Ok(PendingAcquire {
            inner: self.inner.clone(),
            name: name.to_vec(),
            request_id,
            replies,
            queued: false,
            done: false,
        })
    }

    /// Releases the session's hold of `name`, whatever its token (guards
    /// release their own hold only, by token, on drop).
    pub fn release(&self, name: impl AsRef<[u8]>) -> Result<()> {
        release(&self.inner, name.as_ref(), 0)
    }

    /// Renews the lease of the session's hold of `name`, whatever its
    /// token: it now ends `lease` from now unless extended.
    pub fn extend(&self, name: impl AsRef<[u8]>, lease: Duration) -> Result<()> {
        extend(&self.inner, name.as_ref(), lease, 0)
    }

    /// One round trip.
    pub fn ping(&self) -> Result<Duration> {
        let start = Instant::now();
        self.call(&Request::Ping)?;
        Ok(start.elapsed())
    }

    /// Raises `signal` on a held lock: every holder gets `Event::Signal`.
    /// Any session may signal any held lock; a free lock is `NotHeld`.
    pub fn signal(&self, name: impl AsRef<[u8]>, signal: impl AsRef<[u8]>) -> Result<()> {
        self.signal_op(name.as_ref(), signal.as_ref(), SignalKind::Raise)
            .map(|_| ())
    }

    /// Whether `signal` is raised on a held lock.
    pub fn signal_exists(&self, name: impl AsRef<[u8]>, signal: impl AsRef<[u8]>) -> Result<bool> {
        self.signal_op(name.as_ref(), signal.as_ref(), SignalKind::Exists)
    }

    /// Clears `signal`; whether it was raised.
    pub fn clear_signal(&self, name: impl AsRef<[u8]>, signal: impl AsRef<[u8]>) -> Result<bool> {
        self.signal_op(name.as_ref(), signal.as_ref(), SignalKind::Clear)
    }

    fn signal_op(&self, name: &[u8], signal: &[u8], op: SignalKind) -> Result<bool> {
        let reply = self.call(&Request::Signal { name, signal, op })?;
        Ok(reply.body.first() == Some(&1))
    }

    /// Who holds `name` and who waits for it (None when nobody holds it).
    /// Reads as its `LockRecord`.
    pub fn inspect(&self, name: impl AsRef<[u8]>) -> Result<Option<Inspection>> {
        let name = name.as_ref();
        match self.call(&Request::Inspect { name }) {
            Ok(reply) => protocol::parse_inspect_body(&reply.body)
                .map(Some)
                .ok_or_else(|| Error::Protocol("bad INSPECT reply".into())),
            Err(Error::Status(Status::NotHeld, _)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Held locks whose name matches the glob `pattern` (`*`, `?`, `[...]`),
    /// sorted by name, at most `limit`, with the server's clock.
    pub fn list(&self, pattern: impl AsRef<[u8]>, limit: u32) -> Result<Listing> {
        let pattern = pattern.as_ref();
        let reply = self.call(&Request::List { pattern, limit })?;
        protocol::parse_list_body(&reply.body)
            .ok_or_else(|| Error::Protocol("bad LIST reply".into()))
    }

    /// Server-wide counts, totals, uptime and version.
    pub fn stats(&self) -> Result<ServerStats> {
        let reply = self.call(&Request::Stats)?;
        protocol::parse_stats_body(&reply.body)
            .ok_or_else(|| Error::Protocol("bad STATS reply".into()))
    }

    /// The `top` busiest lock names lately (at most 500): acquires,
    /// grants, busy refusals, timeouts (counts halve every minute), wait
    /// and hold times (p50, p99, max in ms, within a factor of two), and
    /// how many hold and wait for each now.
    pub fn report(&self, top: u32) -> Result<protocol::Report> {
        self.report_tagged(top, b"")
    }

    /// The usage of the names whose tags (given by pool requests) have
    /// every `key=value` pair of `tag`: a first row named `tag` with their
    /// total (counts added, distributions merged, held and waiting now),
    /// then the `top` busiest of them. Empty `tag`: `report`.
    pub fn report_tagged(&self, top: u32, tag: &[u8]) -> Result<protocol::Report> {
        let reply = self.call(&Request::Report { top, tag })?;
        protocol::parse_report_body(&reply.body)
            .ok_or_else(|| Error::Protocol("bad REPORT reply".into()))
    }

    /// The cluster as its leader sees it (term, commit, each member's
    /// progress); node 0 and no members from a single server.
    pub fn cluster_status(&self) -> Result<protocol::ClusterReply> {
        let reply = self.call(&Request::ClusterStatus)?;
        protocol::parse_cluster_body(&reply.body)
            .ok_or_else(|| Error::Protocol("bad CLUSTER_STATUS reply".into()))
    }

    /// Operator: changes the cluster's members (several at once go through
    /// joint consensus) or hands leadership over. `Ok` once the leader has
    /// proposed it; [`Client::cluster_status`] shows when it is done.
    pub fn cluster_change(&self, change: &protocol::ClusterChange) -> Result<()> {
        let mut body = Vec::new();
        change.put(&mut body);
        self.call(&Request::ClusterChange(&body)).map(|_| ())
    }

    /// Operator: ends other sessions' holds of `name` — every hold (`token`
    /// 0) or the one with `token`; each holder is told LOCK_LOST.
    /// `Status::NotHeld` if nobody holds it, `WrongToken` if no hold has
    /// that token.
    pub fn force_release(&self, name: impl AsRef<[u8]>, token: u64) -> Result<()> {
        let name = name.as_ref();
        self.call(&Request::ForceRelease { name, token })
            .map(|_| ())
    }

    /// Operator: ends session `session_id` (its holds are released, its
    /// queued acquires dropped, its connection closed after one LOCK_LOST
    /// per hold). `Status::UnknownSession` if there is no such session.
    pub fn kill_session(&self, session_id: u64) -> Result<()> {
        self.call(&Request::KillSession { session_id }).map(|_| ())
    }

    /// Ends the session at once (every hold released) and closes.
    pub fn bye(self) -> Result<()> {
        self.call(&Request::Bye).map(|_| ())
    }

    fn send(&self, request: &Request<'_>) -> Result<(u32, Receiver<OwnedReply>)> {
        send(&self.inner, request)
    }

    fn call(&self, request: &Request<'_>) -> Result<OwnedReply> {
        call(&self.inner, request)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closing the socket ends the reader thread (and, without grace, the session).
        let _ = self.inner.wire.stream.lock().shutdown(Shutdown::Both);
    }
}

/// The names of an ACQUIRE_ALL, encoded: (count, bytes).
pub(crate) fn all_names<N: AsRef<[u8]>>(names: &[(N, Mode)]) -> Result<(u16, Vec<u8>)> {
    let list: Vec<(Mode, &[u8])> = names.iter().map(|(n, m)| (*m, n.as_ref())).collect();
    let count = u16::try_from(list.len())
        .map_err(|_| Error::Status(Status::BadBody, "too many names".into()))?;
    let mut bytes = Vec::new();
    protocol::AllNames::encode(&list, &mut bytes);
    Ok((count, bytes))
}

/// The ACQUIRE_ALL of names `all_names` encoded; `BadBody` (not sent) if
/// they are not 1 to 32 distinct valid names.
pub(crate) fn all_request(count: u16, bytes: &[u8], wait: Option<Duration>) -> Result<Request<'_>> {
    let names = protocol::AllNames::parse(count, bytes).ok_or_else(|| {
        Error::Status(
            Status::BadBody,
            "1 to 32 distinct names of 1 to 1024 bytes".into(),
        )
    })?;
    Ok(Request::AcquireAll {
        names,
        wait_ms: wait_ms_of(wait),
        notify_queued: false,
    })
}

/// Each name of a granted ACQUIRE_ALL with its token.
pub(crate) type Granted = Vec<(Vec<u8>, u64)>;

/// What the reply to an ACQUIRE_ALL of `names` says: the (name, token) of
/// each name if granted, `None` if not in time (Busy, TimedOut).
pub(crate) fn all_granted<N: AsRef<[u8]>>(
    names: &[(N, Mode)],
    reply: Result<OwnedReply>,
) -> Result<Option<Granted>> {
    let reply = match reply {
        Ok(reply) => reply,
        Err(Error::Status(Status::Busy | Status::TimedOut, _)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let tokens = protocol::parse_tokens_body(&reply.body, names.len())
        .ok_or_else(|| Error::Protocol("bad ACQUIRE_ALL grant".into()))?;
    let names = names.iter().map(|(n, _)| n.as_ref().to_vec());
    Ok(Some(names.zip(tokens).collect()))
}

/// One requirement of a pool request ([`Client::acquire_pool`]): `need`
/// of the candidates whose tags have every `key=value` pair of `filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub need: u16,
    /// `key=value` pairs joined by `,`; empty: every candidate.
    pub filter: Vec<u8>,
    /// (name, tags): tags are `key=value` pairs joined by `,`.
    pub candidates: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Requirement {
    /// `need` of `names`, untagged, no filter.
    pub fn of<N: AsRef<[u8]>>(need: u16, names: impl IntoIterator<Item = N>) -> Requirement {
        let candidates = names
            .into_iter()
            .map(|n| (n.as_ref().to_vec(), Vec::new()))
            .collect();
        Requirement {
            need,
            filter: Vec::new(),
            candidates,
        }
    }

    /// One name, as a plain lock among the requirements.
    pub fn name(name: impl AsRef<[u8]>) -> Requirement {
        Requirement::of(1, [name])
    }

    /// `need` of tagged candidates (name, tags).
    pub fn tagged<N: AsRef<[u8]>, T: AsRef<[u8]>>(
        need: u16,
        candidates: impl IntoIterator<Item = (N, T)>,
    ) -> Requirement {
        let candidates = candidates
            .into_iter()
            .map(|(n, t)| (n.as_ref().to_vec(), t.as_ref().to_vec()))
            .collect();
        Requirement {
            need,
            filter: Vec::new(),
            candidates,
        }
    }

    /// Only candidates with every `key=value` pair of `filter`.
    pub fn filter(mut self, filter: impl AsRef<[u8]>) -> Requirement {
        self.filter = filter.as_ref().to_vec();
        self
    }
}

/// A granted pool request: the resources each requirement got (request
/// order; each requirement's in candidate order). Dropping it releases the
/// resources, then the pool queues' permits.
#[derive(Debug)]
pub struct PoolGrant {
    // Dropped first: the resources, then the permits.
    resources: Vec<Vec<Guard>>,
    permits: Vec<Guard>,
}

impl PoolGrant {
    /// The guards of requirement `r`'s resources.
    pub fn resources(&self, r: usize) -> &[Guard] {
        &self.resources[r]
    }

    /// The guards of the pool queues' permits (one per requirement that
    /// had more candidates than it needed).
    pub fn queues(&self) -> &[Guard] {
        &self.permits
    }

    /// How many requirements it answers.
    pub fn requirements(&self) -> usize {
        self.resources.len()
    }

    /// Every guard: the resources (requirement by requirement), then the
    /// pool queues' permits.
    pub fn guards(&self) -> impl Iterator<Item = &Guard> {
        self.resources.iter().flatten().chain(&self.permits)
    }

    /// Keeps every hold past this grant (release them by name, or they
    /// end with the session).
    pub fn forget(self) {
        let PoolGrant { resources, permits } = self;
        resources
            .into_iter()
            .flatten()
            .chain(permits)
            .for_each(Guard::forget);
    }

    /// The names of requirement `r`'s resources.
    pub fn names(&self, r: usize) -> Vec<&[u8]> {
        self.resources[r].iter().map(Guard::name).collect()
    }

    /// Releases everything now (the resources, then the permits); the
    /// first error, if any, after trying all.
    pub fn release(self) -> Result<()> {
        let PoolGrant { resources, permits } = self;
        let mut result = Ok(());
        for guard in resources.into_iter().flatten().chain(permits) {
            let released = guard.release();
            if result.is_ok() {
                result = released;
            }
        }
        result
    }
}

/// The requirements of an ACQUIRE_POOL, encoded: (count, bytes).
pub(crate) fn pool_spec(requirements: &[Requirement]) -> Result<(u16, Vec<u8>)> {
    let count = u16::try_from(requirements.len())
        .map_err(|_| Error::Status(Status::BadBody, "too many requirements".into()))?;
    let mut bytes = Vec::new();
    for r in requirements {
        let list: Vec<(&[u8], &[u8])> =
            r.candidates.iter().map(|(n, t)| (&n[..], &t[..])).collect();
        crate::pool::PoolSpec::encode(r.need, &r.filter, &list, &mut bytes);
    }
    Ok((count, bytes))
}

/// The ACQUIRE_POOL of `pool_spec`'s encoding; `BadBody` (not sent) if
/// the requirements break a rule of `PoolSpec::parse`.
pub(crate) fn pool_request(
    count: u16,
    bytes: &[u8],
    wait: Option<Duration>,
) -> Result<Request<'_>> {
    let spec = crate::pool::PoolSpec::parse(count, bytes).ok_or_else(|| {
        Error::Status(
            Status::BadBody,
            "1 to 16 requirements, 1 <= need <= candidates, at most 64 distinct candidate \
             names in all, tags and filters as key=value,..."
                .into(),
        )
    })?;
    Ok(Request::AcquirePool {
        spec,
        wait_ms: wait_ms_of(wait),
        notify_queued: false,
    })
}

/// One requirement's part of a granted pool request: (name, token) of
/// each resource, and of the pool queue's permits.
pub(crate) struct RequirementGranted {
    pub resources: Granted,
    pub permits: Option<(Vec<u8>, u64)>,
}

/// What the reply to an ACQUIRE_POOL of `requirements` says, `None` if not
/// in time (Busy, TimedOut).
pub(crate) fn pool_granted(
    requirements: &[Requirement],
    reply: Result<OwnedReply>,
) -> Result<Option<Vec<RequirementGranted>>> {
    let reply = match reply {
        Ok(reply) => reply,
        Err(Error::Status(Status::Busy | Status::TimedOut, _)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = || Error::Protocol("bad ACQUIRE_POOL grant".into());
    let needs: Vec<u16> = requirements.iter().map(|r| r.need).collect();
    let grants = crate::pool::parse_grant(&reply.body, &needs).ok_or_else(bad)?;
    let mut out = Vec::with_capacity(grants.len());
    for (r, grant) in requirements.iter().zip(grants) {
        let resources = grant
            .taken
            .iter()
            .map(|&(i, token)| {
                let (name, _) = r.candidates.get(usize::from(i)).ok_or_else(bad)?;
                Ok((name.clone(), token))
            })
            .collect::<Result<Granted>>()?;
        out.push(RequirementGranted {
            resources,
            permits: grant.permits,
        });
    }
    Ok(Some(out))
}

/// A wait as the protocol says it: `None` forever.
pub(crate) fn wait_ms_of(wait: Option<Duration>) -> u32 {
    match wait {
        None => WAIT_FOREVER,
        Some(wait) => u32::try_from(wait.as_millis())
            .unwrap_or(WAIT_FOREVER - 1)
            .min(WAIT_FOREVER - 1),
    }
}

/// The ACQUIRE of `name` as `options` say.
pub(crate) fn acquire_request(
    name: &[u8],
    options: AcquireOptions,
    notify_queued: bool,
) -> Request<'_> {
    let wait_ms = wait_ms_of(options.wait);
    let lease_ms = options.lease.map_or(0, |l| {
        u32::try_from(l.as_millis()).unwrap_or(u32::MAX).max(1)
    });
    let (weight, capacity) = match options.mode {
        Mode::Permits => (options.weight, options.capacity),
        Mode::Exclusive | Mode::Shared => (1, 0),
    };
    Request::Acquire {
        name,
        mode: options.mode,
        weight,
        capacity,
        wait_ms,
        lease_ms,
        notify_queued,
    }
}

/// The connection's bytes, as written: plain TCP, or TLS over it (feature
/// `tls`). Writers and the reader's TLS replies (handshake, alerts) take
/// the stream's lock, then the TLS state's.
struct Wire {
    stream: Mutex<TcpStream>,
    #[cfg(feature = "tls")]
    tls: Option<Mutex<rustls::ClientConnection>>,
}

impl Wire {
    /// The wire over `stream`: with TLS options, after the handshake.
    fn open(stream: &mut TcpStream, _options: &ClientOptions) -> Result<Wire> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &_options.tls {
            let mut session = tls
                .session()
                .map_err(|e| Error::Protocol(format!("TLS: {e}")))?;
            while session.is_handshaking() {
                session.complete_io(stream)?;
            }
            return Ok(Wire {
                stream: Mutex::new(stream.try_clone()?),
                tls: Some(Mutex::new(session)),
            });
        }
        Ok(Wire {
            stream: Mutex::new(stream.try_clone()?),
            #[cfg(feature = "tls")]
            tls: None,
        })
    }

    /// Writes `bytes` whole (through TLS if the wire has it), and whatever
    /// TLS has to send. The stream's lock keeps writes in order; the TLS
    /// state is locked only to encrypt, never across a socket write that
    /// may block, so the reader can always decrypt meanwhile.
    fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        self.write_locked(&mut self.stream.lock(), bytes)
    }

    fn write_locked(&self, stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let mut records = Vec::new();
            {
                let mut tls = tls.lock();
                tls.writer().write_all(bytes)?;
                while tls.wants_write() {
                    tls.write_tls(&mut records)?;
                }
            }
            return stream.write_all(&records);
        }
        stream.write_all(bytes)
    }
}

/// The reading side of a wire: the socket, decrypted when the wire is TLS.
struct WireReader {
    raw: TcpStream,
    #[cfg(feature = "tls")]
    wire: Arc<Wire>,
}

impl Read for WireReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.wire.tls {
            loop {
                match tls.lock().reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                let mut chunk = [0u8; 16 * 1024];
                let n = self.raw.read(&mut chunk)?;
                if n == 0 {
                    return Ok(0);
                }
                let wants_write = {
                    let mut tls = tls.lock();
                    let mut data = &chunk[..n];
                    while !data.is_empty() {
                        tls.read_tls(&mut data)?;
                        tls.process_new_packets().map_err(io::Error::other)?;
                    }
                    tls.wants_write()
                };
                // What TLS has to say back (rare after the handshake) goes
                // now if no writer is busy; else with the next write.
                if wants_write {
                    if let Some(mut stream) = self.wire.stream.try_lock() {
                        self.wire.write_locked(&mut stream, &[])?;
                    }
                }
            }
        }
        self.raw.read(out)
    }
}

/// Keepalive and TCP_USER_TIMEOUT as the server sets them by default (2 s
/// idle + 3 probes 1 s apart; unacknowledged data dropped after 5 s), so a
/// dead server is found even by a client that sends nothing.
pub(crate) fn set_dead_peer_detection(stream: &impl std::os::fd::AsFd) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(2))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(Duration::from_secs(5)))
}

/// Request ids are the session's: after a RESUME, requests of the previous
/// connection may still be in flight (their replies come here), so a
/// resumed client starts its ids at a random point, far from those.
fn first_request_id(first: &Request<'_>) -> u32 {
    match first {
        Request::Resume { .. } => {
            let mut bytes = [0u8; 4];
            getrandom::getrandom(&mut bytes).expect("the OS random source works");
            u32::from_le_bytes(bytes).max(2)
        }
        _ => 2,
    }
}

/// The next request id of a session (never 0: pushes use it).
pub(crate) fn next_request_id(next: &AtomicU32) -> u32 {
    loop {
        let id = next.fetch_add(1, Ordering::Relaxed);
        if id != 0 {
            break id;
        }
    }
}

fn send(inner: &Inner, request: &Request<'_>) -> Result<(u32, Receiver<OwnedReply>)> {
    let request_id = next_request_id(&inner.next_id);
    let (tx, rx) = crossbeam_channel::bounded(2);
    let acquire = match request {
        Request::Acquire { name, .. } => Some(name.to_vec()),
        _ => None,
    };
    match inner.waiting.lock().as_mut() {
        Some(waiting) => waiting.insert(request_id, Waiter { tx, acquire }),
        None => return Err(Error::Disconnected),
    };
    let mut frame = Vec::with_capacity(HEADER_LEN + 64);
    protocol::encode_request(&mut frame, request_id, request);
    let written = inner.wire.write_all(&frame);
    if let Err(e) = written {
        if let Some(waiting) = inner.waiting.lock().as_mut() {
            waiting.remove(&request_id);
        }
        return Err(e.into());
    }
    Ok((request_id, rx))
}

fn call(inner: &Inner, request: &Request<'_>) -> Result<OwnedReply> {
    let (_, rx) = send(inner, request)?;
    let reply = rx.recv().map_err(|_| Error::Disconnected)?;
    match reply.status {
        Status::Ok => Ok(reply),
        status => Err(status_error(status, &reply.body)),
    }
}

/// `token` 0: whatever hold the session has; else only that hold
/// (`WrongToken` if the session's hold has another one).
fn release(inner: &Inner, name: &[u8], token: u64) -> Result<()> {
    call(inner, &Request::Release { name, token }).map(|_| ())
}

fn extend(inner: &Inner, name: &[u8], lease: Duration, token: u64) -> Result<()> {
    let lease_ms = u32::try_from(lease.as_millis()).unwrap_or(u32::MAX).max(1);
    let request = Request::Extend {
        name,
        lease_ms,
        token,
    };
    call(inner, &request).map(|_| ())
}

pub(crate) fn status_error(status: Status, body: &[u8]) -> Error {
    Error::Status(status, String::from_utf8_lossy(body).into_owned())
}

/// An acquire in flight.
pub struct PendingAcquire {
    inner: Arc<Inner>,
    name: Vec<u8>,
    request_id: u32,
    replies: Receiver<OwnedReply>,
    queued: bool,
    /// Its final reply was taken: nothing to cancel when dropped.
    done: bool,
}

impl PendingAcquire {
    pub fn request_id(&self) -> u32 {
        self.request_id
    }

    /// Waits until the server says the acquire is queued (sent with
    /// `notify_queued`) or it has completed, at most `timeout`.
    /// `Ok(true)`: it is queued (or done); `Ok(false)`: still no word.
    pub fn wait_queued(&mut self, timeout: Duration) -> Result<bool> {
        if self.queued {
            return Ok(true);
        }
        match self.replies.recv_timeout(timeout) {
            Ok(reply) if reply.flags & flags::INTERIM != 0 => {
                self.queued = true;
                Ok(true)
            }
            Ok(reply) => {
                // Completed without queueing: keep the answer for `wait`.
                let (tx, rx) = crossbeam_channel::bounded(1);
                let _ = tx.send(reply);
                self.replies = rx;
                self.queued = true;
                Ok(true)
            }
            Err(RecvTimeoutError::Timeout) => Ok(false),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Disconnected),
        }
    }

    /// Waits for the outcome.
    pub fn wait(mut self) -> Result<Guard> {
        loop {
            let reply = self.replies.recv();
            self.done = true;
            let reply = reply.map_err(|_| Error::Disconnected)?;
            if reply.flags & flags::INTERIM != 0 {
                self.done = false;
                continue;
            }
            if reply.status != Status::Ok {
                return Err(status_error(reply.status, &reply.body));
            }
            let token = protocol::parse_token_body(&reply.body)
                .ok_or_else(|| Error::Protocol("short grant".into()))?;
            return Ok(Guard {
                inner: self.inner.clone(),
                name: std::mem::take(&mut self.name),
                token,
                armed: true,
            });
        }
    }

    /// Asks the server to withdraw the acquire; `wait` then reports
    /// `Cancelled` (or the grant, if it came first).
    pub fn cancel(&self) -> Result<()> {
        call(
            &self.inner,
            &Request::Cancel {
                target: self.request_id,
            },
        )
        .map(|_| ())
    }
}

impl Drop for PendingAcquire {
    /// Dropped before its outcome: the acquire is cancelled (and a grant
    /// that comes anyway is released by the reader).
    fn drop(&mut self) {
        // An outcome already here (kept by `wait_queued`): a grant goes back.
        while let Ok(reply) = self.replies.try_recv() {
            if reply.flags & flags::INTERIM != 0 {
                continue;
            }
            self.done = true;
            if let (Status::Ok, Some(token)) =
                (reply.status, protocol::parse_token_body(&reply.body))
            {
                let _ = send(
                    &self.inner,
                    &Request::Release {
                        name: &self.name,
                        token,
                    },
                );
            }
        }
        if !self.done {
            let target = self.request_id;
            let _ = send(&self.inner, &Request::Cancel { target });
        }
    }
}

/// A counting semaphore of a client ([`Client::semaphore`]).
pub struct Semaphore<'c> {
    client: &'c Client,
    name: Vec<u8>,
    capacity: u32,
}

impl Semaphore<'_> {
    /// The options of an acquire of `weight` permits.
    pub fn options(&self, weight: u32) -> AcquireOptions {
        AcquireOptions {
            mode: Mode::Permits,
            weight,
            capacity: self.capacity,
            ..AcquireOptions::default()
        }
    }

    /// Waits (forever, strict FIFO: a large request is not passed by
    /// smaller ones) for `weight` permits.
    pub fn acquire(&self, weight: u32) -> Result<Guard> {
        self.client.acquire_with(&self.name, self.options(weight))
    }

    /// Waits at most `wait` (`ZERO`: one try): `None` if not granted in time.
    pub fn acquire_timeout(&self, weight: u32, wait: Duration) -> Result<Option<Guard>> {
        let options = AcquireOptions {
            wait: Some(wait),
            ..self.options(weight)
        };
        match self.client.acquire_with(&self.name, options) {
            Ok(guard) => Ok(Some(guard)),
            Err(Error::Status(Status::Busy | Status::TimedOut, _)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One try: `None` if the permits are not free now.
    pub fn try_acquire(&self, weight: u32) -> Result<Option<Guard>> {
        self.acquire_timeout(weight, Duration::ZERO)
    }

    /// Changes the capacity of the semaphore while it is in use (holders
    /// keep their permits; queued acquires heavier than the new capacity
    /// end `OverCapacity`); later acquires through this handle name it.
    /// `NotHeld` if the name is not in use, `WrongKind` if it is a lock's.
    pub fn set_capacity(&mut self, capacity: u32) -> Result<()> {
        let request = Request::SetCapacity {
            name: &self.name,
            capacity,
        };
        self.client.call(&request)?;
        self.capacity = capacity;
        Ok(())
    }
}

/// A hold. Released when dropped (unless [`Guard::forget`] was called).
pub struct Guard {
    inner: Arc<Inner>,
    name: Vec<u8>,
    token: u64,
    armed: bool,
}

impl Guard {
    /// The fencing token of this grant: strictly greater than any earlier
    /// grant's token for the same lock.
    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Releases now and reports how it went.
    pub fn release(mut self) -> Result<()> {
        self.armed = false;
        release(&self.inner, &self.name, self.token)
    }

    /// Renews the lease of this hold (`WrongToken` if it was lost and the
    /// session holds the lock again under a newer grant).
    pub fn extend(&self, lease: Duration) -> Result<()> {
        extend(&self.inner, &self.name, lease, self.token)
    }

    /// Keeps the hold without releasing it on drop (it still ends with the
    /// session; a resumed session can release it by name).
    pub fn forget(mut self) {
        self.armed = false;
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("name", &String::from_utf8_lossy(&self.name))
            .field("token", &self.token)
            .finish()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.armed {
            // Only this hold: if its lease ran out and the session took the
            // lock again, the newer hold is left alone.
            let _ = release(&self.inner, &self.name, self.token);
        }
    }
}

/// Takes the whole frame at the front of `buf` off it, if there is one.
pub(crate) fn take_frame(buf: &mut Vec<u8>) -> Result<Option<OwnedFrame>> {
    match protocol::decode_reply(buf) {
        Ok(DecodedReply::Frame { consumed, reply }) => {
            let frame = OwnedFrame::from(&reply);
            buf.drain(..consumed);
            Ok(Some(frame))
        }
        Ok(DecodedReply::Incomplete) => Ok(None),
        Err(e) => Err(Error::Protocol(format!("{e:?}"))),
    }
}

/// Reads one whole frame into `buf` (keeping any bytes after it).
/// `Ok(None)` at a clean end of stream.
fn read_frame(stream: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<OwnedFrame>> {
    loop {
        if let Some(frame) = take_frame(buf)? {
            return Ok(Some(frame));
        }
        let mut chunk = [0u8; 8192];
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A server frame, owned.
pub(crate) struct OwnedFrame {
    pub(crate) opcode: u8,
    pub(crate) request_id: u32,
    pub(crate) flags: u16,
    pub(crate) status: Status,
    pub(crate) body: Vec<u8>,
}

impl From<&protocol::Reply<'_>> for OwnedFrame {
    fn from(reply: &protocol::Reply<'_>) -> OwnedFrame {
        OwnedFrame {
            opcode: reply.opcode,
            request_id: reply.request_id,
            flags: reply.flags,
            status: reply.status,
            body: reply.body.to_vec(),
        }
    }
}

/// What a server frame is to a client (blocking or async).
pub(crate) enum Incoming {
    /// A push for the application.
    Event(Event),
    /// One hold of a RESUME's listing.
    Held(HeldLock),
    /// The RESUME's listing is complete.
    HeldEnd,
    /// A reply to `request_id`: interim (QUEUED) or final.
    Reply {
        request_id: u32,
        interim: bool,
        reply: OwnedReply,
    },
    /// A push whose body does not parse: the stream cannot be trusted.
    Broken,
}

/// Classifies a server frame.
pub(crate) fn classify(frame: OwnedFrame) -> Incoming {
    if frame.request_id == 0 {
        let body = &frame.body;
        let pushed = match frame.opcode {
            opcode::HELD => Some(protocol::parse_held_body(body).map(|(token, mode, name)| {
                Incoming::Held(HeldLock {
                    name: name.to_vec(),
                    mode,
                    token,
                })
            })),
            opcode::HELD_END => Some(Some(Incoming::HeldEnd)),
            opcode::LOCK_LOST => Some(protocol::parse_lock_lost_body(body).map(|(token, name)| {
                Incoming::Event(Event::LockLost {
                    name: name.to_vec(),
                    token,
                })
            })),
            opcode::SIGNALLED => Some(protocol::parse_signal_body(body).map(|(name, signal)| {
                Incoming::Event(Event::Signal {
                    name: name.to_vec(),
                    signal: signal.to_vec(),
                })
            })),
            opcode::SHUTDOWN => Some(Some(Incoming::Event(Event::Shutdown))),
            opcode::SESSION_TAKEN => Some(Some(Incoming::Event(Event::SessionTaken))),
            _ => None,
        };
        if let Some(pushed) = pushed {
            return pushed.unwrap_or(Incoming::Broken);
        }
    }
    Incoming::Reply {
        request_id: frame.request_id,
        interim: frame.flags & flags::INTERIM != 0,
        reply: OwnedReply {
            flags: frame.flags,
            status: frame.status,
            body: frame.body,
        },
    }
}

fn read_loop(
    mut stream: WireReader,
    mut buf: Vec<u8>,
    inner: Arc<Inner>,
    events: Sender<Event>,
    listed: Sender<()>,
) {
    while let Ok(Some(frame)) = read_frame(&mut stream, &mut buf) {
        match classify(frame) {
            Incoming::Held(held) => {
                if let Some(resumed) = inner.resumed.lock().as_mut() {
                    resumed.holds.push(held);
                }
            }
            Incoming::HeldEnd => {
                let _ = listed.try_send(());
            }
            Incoming::Event(event) => push_event(&events, &inner, event),
            Incoming::Reply {
                request_id,
                interim,
                reply,
            } => {
                let mut waiting = inner.waiting.lock();
                let Some(map) = waiting.as_mut() else { break };
                let (tx, acquire) = match interim {
                    true => (map.get(&request_id).map(|w| w.tx.clone()), None),
                    false => match map.remove(&request_id) {
                        Some(Waiter { tx, acquire }) => (Some(tx), acquire),
                        None => (None, None),
                    },
                };
                drop(waiting);
                // A reply nobody waits for (e.g. HelloTimeout with id 0) is dropped.
                let Some(tx) = tx else { continue };
                if let Err(unread) = tx.send(reply) {
                    // A grant whose PendingAcquire was dropped: let it go.
                    let reply = unread.into_inner();
                    let token = protocol::parse_token_body(&reply.body);
                    if let (Some(name), Status::Ok, Some(token)) = (acquire, reply.status, token) {
                        let _ = send(&inner, &Request::Release { name: &name, token });
                    }
                }
            }
            Incoming::Broken => break,
        }
    }
    // Dropping the senders wakes every caller with Disconnected.
    inner.waiting.lock().take();
    push_event(&events, &inner, Event::Disconnected);
}

/// Queues a pushed event (if the application still has the queue). A signal is dropped (and counted) when `EVENTS_MAX` events are unread, so
/// signals never take the room reserved for the others; those are never
/// dropped: past `EVENTS_QUEUE_MAX` unread, the reader waits for the
/// application. This thread is the queue's only sender, so the length it
/// reads can only shrink before the send.
fn push_event(events: &Sender<Event>, inner: &Inner, event: Event) {
    if matches!(event, Event::Signal { .. }) && events.len() >= EVENTS_MAX {
        inner.signals_dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let _ = events.send(event);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener};

    /// A one-connection server: answers the HELLO, sends `pushes`, closes.
    fn fake_server(pushes: Vec<u8>) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            // The HELLO (its content does not matter here).
            loop {
                if let Ok(protocol::Decoded::Frame { .. }) = protocol::decode_request(&buf) {
                    break;
                }
                let mut chunk = [0u8; 1024];
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "the client closed before its HELLO");
                buf.extend_from_slice(&chunk[..n]);
            }
            let mut out = Vec::new();
            protocol::encode_session(&mut out, opcode::HELLO, 1, 7, &[1; SECRET_LEN], 0);
            out.extend_from_slice(&pushes);
            stream.write_all(&out).unwrap();
            // Dropping the stream closes the connection.
        });
        (addr, server)
    }

    #[test]
    fn the_client_socket_finds_a_dead_server() {
        let (addr, server) = fake_server(Vec::new());
        let client = Client::connect(addr, &ClientOptions::default()).unwrap();
        server.join().unwrap();
        let writer = client.inner.wire.stream.lock();
        let socket = socket2::SockRef::from(&*writer);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.keepalive_time().unwrap(), Duration::from_secs(2));
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(5))
        );
    }

    /// A fake server floods signals, then loses a hold, shuts down and
    /// closes: the loss, the shutdown and the disconnection all arrive;
    /// only signals past `EVENTS_MAX` are dropped, and counted.
    #[test]
    fn a_flood_of_signals_never_drops_lock_lost() {
        const FLOOD: usize = EVENTS_MAX + 100;
        let mut pushes = Vec::new();
        for _ in 0..FLOOD {
            protocol::encode_signal(&mut pushes, b"job", b"reload");
        }
        protocol::encode_lock_lost(&mut pushes, 42, b"job");
        protocol::encode_push(&mut pushes, opcode::SHUTDOWN);
        let (addr, server) = fake_server(pushes);
        let client = Client::connect(addr, &ClientOptions::default()).unwrap();
        server.join().unwrap();
        let start = Instant::now();
        while client.inner.waiting.lock().is_some() || client.events().len() < EVENTS_MAX + 3 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the reader did not take every frame off the socket"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let events: Vec<Event> = client.events().try_iter().collect();
        let signals = events
            .iter()
            .filter(|e| matches!(e, Event::Signal { .. }))
            .count();
        assert_eq!(signals, EVENTS_MAX);
        assert_eq!(client.signals_dropped(), (FLOOD - EVENTS_MAX) as u64);
        assert_eq!(
            &events[EVENTS_MAX..],
            &[
                Event::LockLost {
                    name: b"job".to_vec(),
                    token: 42
                },
                Event::Shutdown,
                Event::Disconnected
            ]
        );
    }
}
