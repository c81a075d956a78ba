//! The async client for tokio services (feature `tokio`): the sessions,
//! locks and events of the blocking client (`client`), over a tokio
//! `TcpStream`, with TLS when `ClientOptions::tls` says (tokio-rustls). One reader task hands each final reply to the request that
//! waits for it and queues pushes as events; one writer task sends frames
//! in order, so a guard dropped outside `async` code can still release its
//! hold. Frames are classified by `client::classify`, shared with the
//! blocking client.
//!
//! ```no_run
//! # async fn demo() -> livelock::client::Result<()> {
//! use livelock::client::ClientOptions;
//! use livelock::client_async::AsyncClient;
//!
//! let client = AsyncClient::connect("127.0.0.1:7873", &ClientOptions::default()).await?;
//! let guard = client.acquire("report-42").await?; // waits, FIFO
//! println!("fencing token {}", guard.token());
//! guard.release().await?;
//! client.bye().await
//! # }
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};

use crate::client::{
    acquire_request, classify, next_request_id, set_dead_peer_detection, status_error, take_frame,
    AcquireOptions, ClientOptions, Error, Event, Incoming, OwnedFrame, OwnedReply, Result,
    EVENTS_MAX, EVENTS_QUEUE_MAX,
};
use crate::protocol::{self, Mode, Request, Status, SECRET_LEN};

/// The halves of the connection, plain or TLS (`ClientOptions::tls`).
type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

/// A request waiting for its final reply: where it goes, and for an
/// ACQUIRE the lock's name (a grant nobody waits for any more — its future
/// was dropped — is released at once).
struct Waiter {
    tx: oneshot::Sender<OwnedReply>,
    /// What an acquire's grant would hold (one name, or an ACQUIRE_ALL's).
    acquire: Vec<Vec<u8>>,
}

/// Requests waiting for their final reply, by request id; `None` once the
/// connection is gone.
type Waiting = Mutex<Option<HashMap<u32, Waiter>>>;

struct Inner {
    /// Frames to send, in order (the writer task owns the socket's half).
    frames: mpsc::UnboundedSender<Vec<u8>>,
    waiting: Waiting,
    next_id: AtomicU32,
    session_id: u64,
    secret: [u8; SECRET_LEN],
    signals_dropped: AtomicU64,
}

impl Inner {
    /// Sends `request` and returns where its final reply will arrive.
    /// Sends `request`; returns its id and where its final reply arrives.
    fn send(&self, request: &Request<'_>) -> Result<(u32, oneshot::Receiver<OwnedReply>)> {
        let request_id = next_request_id(&self.next_id);
        let (tx, rx) = oneshot::channel();
        let acquire = match request {
            Request::Acquire { name, .. } => vec![name.to_vec()],
            Request::AcquireAll { names, .. } => names.iter().map(|(_, n)| n.to_vec()).collect(),
            _ => Vec::new(),
        };
        match self.waiting.lock().as_mut() {
            Some(map) => map.insert(request_id, Waiter { tx, acquire }),
            None => return Err(Error::Disconnected),
        };
        self.send_frame(request_id, request)?;
        Ok((request_id, rx))
    }

    /// Sends `request` and answers nothing back (a release or a cancel of
    /// something dropped).
    fn send_frame(&self, request_id: u32, request: &Request<'_>) -> Result<()> {
        let mut frame = Vec::new();
        protocol::encode_request(&mut frame, request_id, request);
        self.frames.send(frame).map_err(|_| Error::Disconnected)
    }

    async fn call(&self, request: &Request<'_>) -> Result<OwnedReply> {
        let (request_id, rx) = self.send(request)?;
        // Dropped before the answer (a timeout, a select): an ACQUIRE is
        // cancelled (and a grant that comes anyway released by the reader).
        let mut cancel = CancelOnDrop {
            inner: self,
            request_id: matches!(
                request,
                Request::Acquire { .. } | Request::AcquireAll { .. }
            )
            .then_some(request_id),
        };
        let reply = rx.await.map_err(|_| Error::Disconnected);
        cancel.request_id = None;
        let reply = reply?;
        match reply.status {
            Status::Ok => Ok(reply),
            status => Err(status_error(status, &reply.body)),
        }
    }
}

/// Cancels an ACQUIRE whose caller stopped waiting.
struct CancelOnDrop<'a> {
    inner: &'a Inner,
    request_id: Option<u32>,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(target) = self.request_id {
            let id = next_request_id(&self.inner.next_id);
            let _ = self.inner.send_frame(id, &Request::Cancel { target });
        }
    }
}

/// A connection whose HELLO the server accepted.
struct Opened {
    reader: ReadHalf,
    writer: WriteHalf,
    /// What was read after the reply.
    buf: Vec<u8>,
    session_id: u64,
    secret: [u8; SECRET_LEN],
}

/// Connects to `addr` and sends `hello` (an encoded HELLO): the session,
/// once the server accepts it.
async fn open(addr: std::net::SocketAddr, options: &ClientOptions, hello: &[u8]) -> Result<Opened> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    set_dead_peer_detection(&stream)?;
    let (mut reader, mut writer): (ReadHalf, WriteHalf) = match &options.tls {
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.config());
            let stream = connector.connect(tls.server_name(), stream).await?;
            let (reader, writer) = tokio::io::split(stream);
            (Box::new(reader), Box::new(writer))
        }
        None => {
            let (reader, writer) = stream.into_split();
            (Box::new(reader), Box::new(writer))
        }
    };
    writer.write_all(hello).await?;
    writer.flush().await?;
    let mut buf = Vec::new();
    let reply = read_frame(&mut reader, &mut buf)
        .await?
        .ok_or(Error::Disconnected)?;
    if reply.status != Status::Ok {
        return Err(status_error(reply.status, &reply.body));
    }
    let (session_id, secret, _) = protocol::parse_session_body(&reply.body)
        .ok_or_else(|| Error::Protocol("short session reply".into()))?;
    Ok(Opened {
        reader,
        writer,
        buf,
        session_id,
        secret,
    })
}

/// A session with the server, for tokio tasks. Cheap to share (`Arc`).
pub struct AsyncClient {
    inner: Arc<Inner>,
    events: Mutex<mpsc::Receiver<Event>>,
}

impl AsyncClient {
    /// Connects and opens a session (HELLO): each address in turn, the
    /// whole handshake within `options.connect_timeout` (a cluster's
    /// members: one that is down, frozen or slow is passed over; a
    /// server's refusal is final).
    pub async fn connect(addr: impl ToSocketAddrs, options: &ClientOptions) -> Result<AsyncClient> {
        let grace_ms = u32::try_from(options.grace.as_millis()).unwrap_or(u32::MAX);
        let hello = Request::Hello {
            grace_ms,
            password: options.password.as_deref().unwrap_or("").as_bytes(),
            client_name: options.client_name.as_bytes(),
        };
        let mut frame = Vec::new();
        protocol::encode_request(&mut frame, 1, &hello);
        let mut last = Error::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address to connect to",
        ));
        let addrs = tokio::time::timeout(options.connect_timeout, tokio::net::lookup_host(addr))
            .await
            .map_err(|_| Error::Io(std::io::ErrorKind::TimedOut.into()))??;
        for addr in addrs {
            let opened = tokio::time::timeout(options.connect_timeout, open(addr, options, &frame))
                .await
                .unwrap_or_else(|_| Err(Error::Io(std::io::ErrorKind::TimedOut.into())));
            match opened {
                Ok(opened) => return Ok(AsyncClient::start(opened)),
                Err(e @ Error::Status(..)) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The session a handshake opened, served by its reader and writer tasks.
    fn start(
        Opened {
            reader,
            writer,
            buf,
            session_id,
            secret,
        }: Opened,
    ) -> AsyncClient {
        let (frames, frames_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::channel(EVENTS_QUEUE_MAX);
        let inner = Arc::new(Inner {
            frames,
            waiting: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU32::new(2),
            session_id,
            secret,
            signals_dropped: AtomicU64::new(0),
        });
        tokio::spawn(write_loop(writer, frames_rx));
        tokio::spawn(read_loop(reader, buf, inner.clone(), events_tx));
        AsyncClient {
            inner,
            events: Mutex::new(events),
        }
    }

    pub fn session_id(&self) -> u64 {
        self.inner.session_id
    }

    /// The secret a RESUME needs, with `session_id`.
    pub fn secret(&self) -> [u8; SECRET_LEN] {
        self.inner.secret
    }

    /// The next pushed event (lock lost, signal, shutdown, session taken,
    /// disconnected); `None` once the connection is gone and every event
    /// was read. Only signals are ever dropped (past `EVENTS_MAX` unread).
    pub async fn next_event(&self) -> Option<Event> {
        std::future::poll_fn(|cx| self.events.lock().poll_recv(cx)).await
    }

    /// The pushed events as a `Stream` (what `next_event` yields, in order).
    pub fn events(&self) -> Events<'_> {
        Events { client: self }
    }

    /// How many signals were dropped because `EVENTS_MAX` were unread.
    pub fn signals_dropped(&self) -> u64 {
        self.inner.signals_dropped.load(Ordering::Relaxed)
    }

    /// Waits (forever, FIFO) for an exclusive hold.
    pub async fn acquire(&self, name: impl AsRef<[u8]>) -> Result<AsyncGuard> {
        self.acquire_with(name, AcquireOptions::default()).await
    }

    /// One attempt: `None` if someone else holds it.
    pub async fn try_acquire(&self, name: impl AsRef<[u8]>) -> Result<Option<AsyncGuard>> {
        self.acquire_timeout(name, Duration::ZERO).await
    }

    /// Waits at most `wait` (server-side): `None` if not granted in time.
    pub async fn acquire_timeout(
        &self,
        name: impl AsRef<[u8]>,
        wait: Duration,
    ) -> Result<Option<AsyncGuard>> {
        let options = AcquireOptions {
            wait: Some(wait),
            ..AcquireOptions::default()
        };
        match self.acquire_with(name, options).await {
            Ok(guard) => Ok(Some(guard)),
            Err(Error::Status(Status::Busy | Status::TimedOut, _)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits (forever) for a shared hold.
    pub async fn acquire_shared(&self, name: impl AsRef<[u8]>) -> Result<AsyncGuard> {
        let options = AcquireOptions {
            mode: Mode::Shared,
            ..AcquireOptions::default()
        };
        self.acquire_with(name, options).await
    }

    /// Acquires as `options` say; a refusal is `Error::Status(Busy | TimedOut | ...)`.
    /// Dropping the future before the grant (a timeout, a `select!`)
    /// cancels the acquire; a grant that comes anyway is released at once.
    pub async fn acquire_with(
        &self,
        name: impl AsRef<[u8]>,
        options: AcquireOptions,
    ) -> Result<AsyncGuard> {
        let name = name.as_ref();
        let reply = self
            .inner
            .call(&acquire_request(name, options, false))
            .await?;
        let token = protocol::parse_token_body(&reply.body)
            .ok_or_else(|| Error::Protocol("bad grant".into()))?;
        Ok(AsyncGuard {
            inner: self.inner.clone(),
            name: name.to_vec(),
            token,
            armed: true,
        })
    }

    /// `weight` permits of the counting semaphore `name` of `capacity`
    /// (see `Client::semaphore`), waiting at most `wait` (`None`: forever;
    /// `Some(ZERO)`: one try, `Busy` if they are not free).
    pub async fn acquire_permits(
        &self,
        name: impl AsRef<[u8]>,
        (weight, capacity): (u32, u32),
        wait: Option<Duration>,
    ) -> Result<AsyncGuard> {
        let options = AcquireOptions {
            mode: Mode::Permits,
            weight,
            capacity,
            wait,
            lease: None,
        };
        self.acquire_with(name, options).await
    }

    /// Takes every name at once, all or none (see `Client::acquire_all`):
    /// one guard per name, in `names`' order; `Ok(None)` if not granted
    /// within `wait` (`None`: forever; `Some(ZERO)`: one try). Dropping
    /// the future before the grant cancels it (a grant that comes anyway
    /// is released, every name).
    pub async fn acquire_all<N: AsRef<[u8]>>(
        &self,
        names: &[(N, Mode)],
        wait: Option<Duration>,
    ) -> Result<Option<Vec<AsyncGuard>>> {
        let (count, bytes) = crate::client::all_names(names)?;
        let request = crate::client::all_request(count, &bytes, wait)?;
        let granted = crate::client::all_granted(names, self.inner.call(&request).await)?;
        let guard = |(name, token)| AsyncGuard {
            inner: self.inner.clone(),
            name,
            token,
            armed: true,
        };
        Ok(granted.map(|all| all.into_iter().map(guard).collect()))
    }

    /// Changes the capacity of the semaphore `name` while it is in use
    /// (see `Semaphore::set_capacity`).
    pub async fn set_capacity(&self, name: impl AsRef<[u8]>, capacity: u32) -> Result<()> {
        let request = Request::SetCapacity {
            name: name.as_ref(),
            capacity,
        };
        self.inner.call(&request).await.map(|_| ())
    }

    /// Declares the order this session's acquires keep (see
    /// `Client::set_order`).
    pub async fn set_order(&self, order: Option<&crate::order::Order>) -> Result<()> {
        let mut body = Vec::new();
        crate::order::Order::encode(order, &mut body);
        self.inner.call(&Request::SetOrder(&body)).await.map(|_| ())
    }

    /// One round trip.
    pub async fn ping(&self) -> Result<Duration> {
        let start = tokio::time::Instant::now();
        self.inner.call(&Request::Ping).await?;
        Ok(start.elapsed())
    }

    /// Raises `signal` on a held lock: every holder gets `Event::Signal`.
    pub async fn signal(&self, name: impl AsRef<[u8]>, signal: impl AsRef<[u8]>) -> Result<()> {
        let request = Request::Signal {
            name: name.as_ref(),
            signal: signal.as_ref(),
            op: protocol::SignalKind::Raise,
        };
        self.inner.call(&request).await.map(|_| ())
    }

    /// Who holds `name` and who waits (None when nobody holds it).
    pub async fn inspect(&self, name: impl AsRef<[u8]>) -> Result<Option<protocol::Inspection>> {
        let name = name.as_ref();
        match self.inner.call(&Request::Inspect { name }).await {
            Ok(reply) => protocol::parse_inspect_body(&reply.body)
                .map(Some)
                .ok_or_else(|| Error::Protocol("bad INSPECT reply".into())),
            Err(Error::Status(Status::NotHeld, _)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Server-wide counts, totals, uptime and version.
    pub async fn stats(&self) -> Result<protocol::StatsReply> {
        let reply = self.inner.call(&Request::Stats).await?;
        protocol::parse_stats_body(&reply.body)
            .ok_or_else(|| Error::Protocol("bad STATS reply".into()))
    }

    /// Ends the session at once (every hold released) and closes.
    pub async fn bye(self) -> Result<()> {
        self.inner.call(&Request::Bye).await.map(|_| ())
    }
}

impl Drop for AsyncClient {
    /// Closes the connection (the writer task shuts the socket down; the
    /// reader then sees the end): without grace the session ends with it.
    fn drop(&mut self) {
        let _ = self.inner.frames.send(Vec::new());
    }
}

/// The pushed events of a client as a `futures_core::Stream`.
pub struct Events<'a> {
    client: &'a AsyncClient,
}

impl futures_core::Stream for Events<'_> {
    type Item = Event;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        self.client.events.lock().poll_recv(cx)
    }
}

/// A hold of a lock. Release it with `release().await`; dropping it
/// releases it too (the RELEASE is queued for the writer task, no await
/// needed) — only this hold, by its fencing token.
pub struct AsyncGuard {
    inner: Arc<Inner>,
    name: Vec<u8>,
    token: u64,
    armed: bool,
}

impl AsyncGuard {
    /// The fencing token of this grant.
    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Releases this hold and waits for the server's answer.
    pub async fn release(mut self) -> Result<()> {
        self.armed = false;
        let request = Request::Release {
            name: &self.name,
            token: self.token,
        };
        self.inner.call(&request).await.map(|_| ())
    }

    /// Renews this hold's lease: it ends `lease` from now unless extended.
    pub async fn extend(&self, lease: Duration) -> Result<()> {
        let request = Request::Extend {
            name: &self.name,
            lease_ms: u32::try_from(lease.as_millis()).unwrap_or(u32::MAX).max(1),
            token: self.token,
        };
        self.inner.call(&request).await.map(|_| ())
    }

    /// Keeps the hold without releasing it on drop (it ends with the session).
    pub fn forget(mut self) {
        self.armed = false;
    }
}

impl Drop for AsyncGuard {
    fn drop(&mut self) {
        if self.armed {
            let request = Request::Release {
                name: &self.name,
                token: self.token,
            };
            // Nobody waits for the answer.
            let id = next_request_id(&self.inner.next_id);
            let _ = self.inner.send_frame(id, &request);
        }
    }
}

async fn write_loop(mut writer: WriteHalf, mut frames: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(frame) = frames.recv().await {
        // An empty frame: the client was dropped.
        if frame.is_empty()
            || writer.write_all(&frame).await.is_err()
            || writer.flush().await.is_err()
        {
            break;
        }
    }
    let _ = writer.shutdown().await;
}

/// Reads one whole frame into `buf` (keeping any bytes after it); `None` at
/// a clean end of stream.
async fn read_frame(reader: &mut ReadHalf, buf: &mut Vec<u8>) -> Result<Option<OwnedFrame>> {
    loop {
        if let Some(frame) = take_frame(buf)? {
            return Ok(Some(frame));
        }
        let mut chunk = [0u8; 8192];
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn read_loop(
    mut reader: ReadHalf,
    mut buf: Vec<u8>,
    inner: Arc<Inner>,
    events: mpsc::Sender<Event>,
) {
    while let Ok(Some(frame)) = read_frame(&mut reader, &mut buf).await {
        match classify(frame) {
            Incoming::Event(event) => {
                if matches!(event, Event::Signal { .. })
                    && events.max_capacity() - events.capacity() >= EVENTS_MAX
                {
                    inner.signals_dropped.fetch_add(1, Ordering::Relaxed);
                } else if events.send(event).await.is_err() {
                    // The client is gone: nobody reads events any more.
                }
            }
            Incoming::Reply {
                request_id,
                interim: false,
                reply,
            } => {
                let waiter = inner
                    .waiting
                    .lock()
                    .as_mut()
                    .and_then(|map| map.remove(&request_id));
                if let Some(Waiter { tx, acquire }) = waiter {
                    if let Err(reply) = tx.send(reply) {
                        // A grant whose future was dropped: let it go.
                        let tokens = protocol::parse_tokens_body(&reply.body, acquire.len());
                        if let (Status::Ok, Some(tokens)) = (reply.status, tokens) {
                            for (name, token) in acquire.iter().zip(tokens) {
                                let id = next_request_id(&inner.next_id);
                                let _ = inner.send_frame(id, &Request::Release { name, token });
                            }
                        }
                    }
                }
            }
            // QUEUED notices and a RESUME's listing: this client asks for neither.
            Incoming::Reply { .. } | Incoming::Held(_) | Incoming::HeldEnd => {}
            Incoming::Broken => break,
        }
    }
    // Dropping the senders wakes every waiting call with Disconnected.
    inner.waiting.lock().take();
    let _ = events.send(Event::Disconnected).await;
}
