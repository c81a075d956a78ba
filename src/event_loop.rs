//! One event-loop thread: a hand-rolled `mio::Poll` loop that owns its
//! connections, the sessions whose home it is, its shard of the lock table
//! and their timers. Nothing here is shared behind a mutex.
//!
//! A turn of the loop: poll (with the earliest deadline as timeout), accept,
//! read and decode ready connections (a bounded number of frames each),
//! drain the inbox of messages from other loops, fire due timers, send the
//! messages this turn produced to other loops (one wake-up per destination
//! per turn), and flush every connection that got output (one write pass per
//! connection per turn).
//!
//! Routing (see docs/ARCHITECTURE.md): a request for lock `name` goes to
//! shard `shard_for(name)`, applied directly when that is this loop, else
//! sent over the owner's bounded channel. Every effect for a session goes to
//! `home_of(session)`. Both ends assert the routing.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::ServerConfig;
use crate::connection::{Codec, Connection, ReadState};
use crate::limits::{
    CONNECTIONS_MAX, FRAMES_PER_TURN_MAX, GRACE_MS_MAX, HOLDS_PER_SESSION_MAX,
    IN_FLIGHT_PER_SESSION_MAX, OUTBOX_PARK_MAX, SHUTDOWN_FLUSH_MS, WRITE_BUFFER_MAX,
    WRITE_BUFFER_PAUSE,
};
use crate::lock_table::{
    shard_for, Acquire, Command, Effect, LockTable, Outcome, RequestId, SessionId, Wait,
};
use crate::protocol::{
    self, opcode, Decoded, Fatal, Mode, Request, Status, SECRET_LEN, WAIT_FOREVER,
};
use crate::session::{home_of, secure_eq, Pending, Session, Sessions};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// Inbox messages handled per turn before sockets get their turn again.
const INBOX_PER_TURN_MAX: usize = 4096;

/// The server's one clock: milliseconds since start, shared by all loops so
/// deadlines stamped on one loop mean the same on another.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// How to reach another loop.
pub struct Peer {
    pub tx: Sender<Msg>,
    pub waker: Arc<Waker>,
}

/// What every loop shares: read-only settings, the clock, the way to reach
/// each loop, and the connection count.
pub struct Shared {
    pub config: ServerConfig,
    pub clock: Clock,
    pub peers: Vec<Peer>,
    pub connections: AtomicUsize,
}

/// A lock-table command travelling to the loop that owns its shard.
#[derive(Debug)]
pub enum ShardMsg {
    Acquire {
        session: SessionId,
        request_id: RequestId,
        name: Box<[u8]>,
        mode: Mode,
        wait: Wait,
        lease_ms: u32,
        notify_queued: bool,
    },
    Release {
        session: SessionId,
        request_id: RequestId,
        name: Box<[u8]>,
    },
    Extend {
        session: SessionId,
        request_id: RequestId,
        name: Box<[u8]>,
        lease_ms: u32,
    },
    Cancel {
        session: SessionId,
        request_id: RequestId,
        target: RequestId,
    },
    EndSession {
        session: SessionId,
    },
}

impl ShardMsg {
    fn from_command(command: Command<'_>) -> ShardMsg {
        match command {
            Command::Acquire(a) => {
                debug_assert!(!a.reentrant);
                ShardMsg::Acquire {
                    session: a.session,
                    request_id: a.request_id,
                    name: a.name.into(),
                    mode: a.mode,
                    wait: a.wait,
                    lease_ms: a.lease_ms,
                    notify_queued: a.notify_queued,
                }
            }
            Command::Release {
                session,
                request_id,
                name,
            } => ShardMsg::Release {
                session,
                request_id,
                name: name.into(),
            },
            Command::Extend {
                session,
                request_id,
                name,
                lease_ms,
            } => ShardMsg::Extend {
                session,
                request_id,
                name: name.into(),
                lease_ms,
            },
            Command::Cancel {
                session,
                request_id,
                target,
            } => ShardMsg::Cancel {
                session,
                request_id,
                target,
            },
            Command::EndSession { session } => ShardMsg::EndSession { session },
        }
    }

    fn as_command(&self) -> Command<'_> {
        match *self {
            ShardMsg::Acquire {
                session,
                request_id,
                ref name,
                mode,
                wait,
                lease_ms,
                notify_queued,
            } => Command::Acquire(Acquire {
                session,
                request_id,
                name,
                mode,
                wait,
                lease_ms,
                reentrant: false,
                notify_queued,
            }),
            ShardMsg::Release {
                session,
                request_id,
                ref name,
            } => Command::Release {
                session,
                request_id,
                name,
            },
            ShardMsg::Extend {
                session,
                request_id,
                ref name,
                lease_ms,
            } => Command::Extend {
                session,
                request_id,
                name,
                lease_ms,
            },
            ShardMsg::Cancel {
                session,
                request_id,
                target,
            } => Command::Cancel {
                session,
                request_id,
                target,
            },
            ShardMsg::EndSession { session } => Command::EndSession { session },
        }
    }
}

/// A connection handed to the home loop of the session it RESUMEs, with the
/// bytes it sent that are not decoded yet (starting at the RESUME frame).
pub struct Adoption {
    stream: TcpStream,
    unread: Vec<u8>,
    unwritten: Vec<u8>,
    hello_deadline_ms: u64,
}

/// Messages between loops.
pub enum Msg {
    /// To the owner of the lock's shard.
    Shard(ShardMsg),
    /// To the session's home loop.
    Effect(Effect),
    /// A connection moving to its session's home loop.
    Adopt(Box<Adoption>),
    /// Stop accepting, say goodbye to every client, exit.
    Shutdown,
}

/// What decoding one frame asks of the connection.
enum Flow {
    Continue,
    /// Stop decoding: the connection is closing (its output still flushes).
    Stop,
    /// Stop decoding: hand the connection to loop N, from this frame on.
    Migrate(usize),
}

pub struct EventLoop {
    idx: usize,
    shared: Arc<Shared>,
    poll: Poll,
    listener: Option<TcpListener>,
    inbox: Receiver<Msg>,
    conns: slab::Slab<Connection>,
    sessions: Sessions,
    table: LockTable,
    /// Effects of the last lock-table call, routed by `route_effects`.
    effects: Vec<Effect>,
    /// Messages for each loop, sent at the end of the turn.
    outgoing: Vec<VecDeque<Msg>>,
    /// Connections with input to look at (read not drained or frames left).
    ready: VecDeque<Token>,
    /// Connections with output to flush this turn.
    dirty: Vec<Token>,
    /// (deadline, connection) for connections that have not said HELLO.
    hello_timers: BTreeMap<(u64, usize), ()>,
    /// Messages parked in `outgoing` because a peer's inbox was full.
    parked_total: usize,
    /// Connections not read because of that backlog.
    stalled: Vec<Token>,
    /// Set when shutting down: the instant to give up flushing.
    shutdown_deadline_ms: Option<u64>,
    now_ms: u64,
}

impl EventLoop {
    pub fn new(
        idx: usize,
        shared: Arc<Shared>,
        poll: Poll,
        mut listener: TcpListener,
        inbox: Receiver<Msg>,
    ) -> io::Result<EventLoop> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let loops = shared.peers.len();
        Ok(EventLoop {
            idx,
            poll,
            listener: Some(listener),
            inbox,
            conns: slab::Slab::new(),
            sessions: Sessions::new(idx),
            table: LockTable::new(idx, loops),
            effects: Vec::new(),
            outgoing: (0..loops).map(|_| VecDeque::new()).collect(),
            ready: VecDeque::new(),
            dirty: Vec::new(),
            hello_timers: BTreeMap::new(),
            parked_total: 0,
            stalled: Vec::new(),
            shutdown_deadline_ms: None,
            now_ms: shared.clock.now_ms(),
            shared,
        })
    }

    /// Runs until shutdown has said goodbye to every client.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.now_ms = self.shared.clock.now_ms();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    token => {
                        if event.is_writable() {
                            self.flush(token);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.mark_ready(token);
                        }
                    }
                }
            }
            self.drain_inbox();
            self.service_ready();
            self.fire_timers();
            self.send_outgoing();
            self.flush_dirty();
            if let Some(deadline) = self.shutdown_deadline_ms {
                if self.conns.is_empty() || self.now_ms >= deadline {
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty() || !self.inbox.is_empty() {
            return Some(Duration::ZERO);
        }
        if self.parked_total > 0 {
            // Retry the full inbox soon, without spinning on it.
            return Some(Duration::from_millis(1));
        }
        let deadlines = [
            self.table.next_deadline(),
            self.sessions.next_deadline(),
            self.hello_timers.keys().next().map(|k| k.0),
            self.shutdown_deadline_ms,
        ];
        let next = deadlines.into_iter().flatten().min()?;
        let now = self.shared.clock.now_ms();
        // +1: wake when the millisecond has passed, not just before it.
        Some(Duration::from_millis(next.saturating_sub(now) + 1))
    }

    // ---- connections -------------------------------------------------

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: drop this one, keep serving.
                    eprintln!("livelock: accept failed: {e}");
                    return;
                }
            };
            if self.shared.connections.fetch_add(1, Ordering::Relaxed) >= CONNECTIONS_MAX {
                self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                drop(stream);
                continue;
            }
            if let Err(e) = tune_socket(&stream, &self.shared.config) {
                eprintln!("livelock: tuning an accepted socket failed: {e}");
            }
            let deadline = self.now_ms + self.shared.config.hello_timeout.as_millis() as u64;
            self.add_connection(Connection::new(stream, deadline));
        }
    }

    fn add_connection(&mut self, conn: Connection) -> Option<Token> {
        let entry = self.conns.vacant_entry();
        let token = Token(entry.key());
        let conn = entry.insert(conn);
        if let Err(e) = self.poll.registry().register(
            &mut conn.stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            eprintln!("livelock: registering a connection failed: {e}");
            self.conns.remove(token.0);
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        if conn.hello_deadline_ms != 0 {
            self.hello_timers
                .insert((conn.hello_deadline_ms, token.0), ());
        }
        Some(token)
    }

    fn mark_ready(&mut self, token: Token) {
        if let Some(conn) = self.conns.get_mut(token.0) {
            if !conn.ready {
                conn.ready = true;
                self.ready.push_back(token);
            }
        }
    }

    fn mark_dirty(&mut self, token: Token) {
        if let Some(conn) = self.conns.get_mut(token.0) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(token);
            }
        }
    }

    fn service_ready(&mut self) {
        for _ in 0..self.ready.len() {
            let Some(token) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(token.0) else {
                continue;
            };
            conn.ready = false;
            if conn.closing {
                continue;
            }
            if conn.unwritten() > WRITE_BUFFER_PAUSE {
                // Backpressure: the peer does not read its replies. `flush`
                // resumes reading once it does.
                conn.paused = true;
                continue;
            }
            if self.parked_total > OUTBOX_PARK_MAX {
                // Another loop's inbox is full: read nothing more until
                // `send_outgoing` has delivered the backlog.
                self.stalled.push(token);
                continue;
            }
            let state = if conn.eof {
                ReadState::Eof
            } else {
                match conn.fill() {
                    Ok(state) => state,
                    Err(_) => {
                        self.close(token);
                        continue;
                    }
                }
            };
            if state == ReadState::Eof {
                conn.eof = true;
            }
            let more_frames = self.decode_frames(token);
            let Some(conn) = self.conns.get_mut(token.0) else {
                continue;
            };
            if conn.closing {
                self.mark_dirty(token);
                continue;
            }
            if more_frames || state == ReadState::Full {
                self.mark_ready(token);
            } else if conn.eof {
                self.close(token);
            }
        }
    }

    /// Decodes and handles up to FRAMES_PER_TURN_MAX frames of `token`.
    /// Returns whether whole frames may be left.
    fn decode_frames(&mut self, token: Token) -> bool {
        let conn = &mut self.conns[token.0];
        if conn.codec == Codec::Sniffing {
            match conn.rbuf.get(conn.rpos) {
                None => return false,
                Some(&protocol::MAGIC_BYTE0) => conn.codec = Codec::Native,
                Some(_) => {
                    // Not a protocol we speak: nothing can be said back safely.
                    self.close(token);
                    return false;
                }
            }
        }
        let rbuf = std::mem::take(&mut conn.rbuf);
        let mut pos = conn.rpos;
        let mut flow = Flow::Continue;
        let mut frames = 0;
        let mut more = false;
        while frames < FRAMES_PER_TURN_MAX {
            match protocol::decode_request(&rbuf[pos..]) {
                Ok(Decoded::Incomplete) => break,
                Ok(Decoded::Frame {
                    consumed,
                    opcode,
                    request_id,
                    result,
                }) => {
                    flow = match result {
                        Ok(request) => self.handle_native(token, request_id, request),
                        Err(status) => {
                            self.reply_status(token, opcode, request_id, status, "");
                            Flow::Continue
                        }
                    };
                    if let Flow::Migrate(_) = flow {
                        break; // the migrating frame goes along, undecoded
                    }
                    pos += consumed;
                    frames += 1;
                    if let Flow::Stop = flow {
                        break;
                    }
                }
                Err(fatal) => {
                    // The stream cannot be delimited any more. A frame too
                    // large still has a readable header, so say why first;
                    // bad magic means the peer does not speak this protocol.
                    if let Fatal::FrameTooLarge { .. } = fatal {
                        let (op, id) = header_ids(&rbuf[pos..]);
                        self.reply_status(
                            token,
                            op,
                            id,
                            Status::FrameTooLarge,
                            "frame body too large",
                        );
                    }
                    self.start_closing(token);
                    flow = Flow::Stop;
                    break;
                }
            }
        }
        if frames == FRAMES_PER_TURN_MAX {
            more = true;
        }
        match flow {
            Flow::Migrate(home) => {
                self.migrate(token, rbuf, pos, home);
                false
            }
            _ => {
                if let Some(conn) = self.conns.get_mut(token.0) {
                    conn.rbuf = rbuf;
                    let consumed = pos - conn.rpos;
                    conn.consume(consumed);
                }
                more && matches!(flow, Flow::Continue)
            }
        }
    }

    fn start_closing(&mut self, token: Token) {
        if let Some(conn) = self.conns.get_mut(token.0) {
            conn.closing = true;
        }
        self.mark_dirty(token);
    }

    fn flush(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(token.0) else {
            return;
        };
        match conn.flush() {
            Err(_) => self.close(token),
            Ok(true) if conn.closing => self.close(token),
            Ok(_) => {
                if conn.paused && conn.unwritten() <= WRITE_BUFFER_PAUSE {
                    conn.paused = false;
                    self.mark_ready(token);
                }
            }
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &token in &dirty {
            if let Some(conn) = self.conns.get_mut(token.0) {
                conn.dirty = false;
                if conn.unwritten() > WRITE_BUFFER_MAX {
                    // Owed replies piled up past the hard bound: the peer is stuck.
                    self.close(token);
                    continue;
                }
                self.flush(token);
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Drops the connection; its session detaches (and ends without grace).
    fn close(&mut self, token: Token) {
        let Some(mut conn) = self.conns.try_remove(token.0) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        if let Some(id) = conn.session {
            if self.sessions.get(id).is_some_and(|s| s.conn == Some(token)) {
                if let Some(session) = self.sessions.detach(id, self.now_ms) {
                    self.end_session(session);
                }
            }
        }
    }

    /// Hands the connection to loop `home`, undecoded input from `pos` on.
    fn migrate(&mut self, token: Token, rbuf: Vec<u8>, pos: usize, home: usize) {
        let mut conn = self.conns.remove(token.0);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        assert!(
            conn.session.is_none(),
            "only a session-less connection moves"
        );
        let adoption = Adoption {
            unread: rbuf[pos..].to_vec(),
            unwritten: conn.wbuf[conn.wpos..].to_vec(),
            hello_deadline_ms: conn.hello_deadline_ms,
            stream: conn.stream,
        };
        self.outgoing[home].push_back(Msg::Adopt(Box::new(adoption)));
    }

    fn adopt(&mut self, adoption: Adoption) {
        let mut conn = Connection::new(adoption.stream, adoption.hello_deadline_ms);
        conn.codec = Codec::Native;
        conn.rbuf = adoption.unread;
        conn.wbuf = adoption.unwritten;
        if let Some(token) = self.add_connection(conn) {
            self.mark_ready(token);
            self.mark_dirty(token);
        }
    }

    // ---- requests ----------------------------------------------------

    fn wbuf(&mut self, token: Token) -> &mut Vec<u8> {
        self.mark_dirty(token);
        &mut self.conns[token.0].wbuf
    }

    fn reply_status(
        &mut self,
        token: Token,
        opcode: u8,
        request_id: u32,
        status: Status,
        message: &str,
    ) {
        protocol::encode_status(self.wbuf(token), opcode, request_id, status, message);
    }

    fn handle_native(&mut self, token: Token, request_id: RequestId, request: Request<'_>) -> Flow {
        let session = self.conns[token.0].session;
        match (request, session) {
            (Request::Ping, _) => {
                self.reply_status(token, opcode::PING, request_id, Status::Ok, "");
                Flow::Continue
            }
            (Request::Hello { .. } | Request::Resume { .. }, Some(_)) => {
                let op = if matches!(request, Request::Hello { .. }) {
                    opcode::HELLO
                } else {
                    opcode::RESUME
                };
                self.reply_status(
                    token,
                    op,
                    request_id,
                    Status::SessionExists,
                    "this connection has a session",
                );
                Flow::Continue
            }
            (
                Request::Hello {
                    grace_ms,
                    password,
                    client_name,
                },
                None,
            ) => self.hello(token, request_id, grace_ms, password, client_name),
            (
                Request::Resume {
                    session_id,
                    secret,
                    password,
                },
                None,
            ) => self.resume(token, request_id, session_id, &secret, password),
            (request, None) => {
                let op = request_opcode(&request);
                self.reply_status(token, op, request_id, Status::NoSession, "say HELLO first");
                Flow::Continue
            }
            (Request::Bye, Some(id)) => {
                if let Some(session) = self.sessions.remove(id) {
                    self.end_session(session);
                }
                self.conns[token.0].session = None;
                self.reply_status(token, opcode::BYE, request_id, Status::Ok, "");
                self.start_closing(token);
                Flow::Stop
            }
            (request, Some(id)) => {
                self.session_request(token, id, request_id, request);
                Flow::Continue
            }
        }
    }

    fn check_password(&mut self, token: Token, op: u8, request_id: u32, password: &[u8]) -> bool {
        let ok = match &self.shared.config.password {
            Some(expected) => secure_eq(expected, password),
            None => true,
        };
        if !ok {
            self.reply_status(
                token,
                op,
                request_id,
                Status::Auth,
                "wrong or missing password",
            );
            self.start_closing(token);
        }
        ok
    }

    fn hello(
        &mut self,
        token: Token,
        request_id: u32,
        grace_ms: u32,
        password: &[u8],
        client_name: &[u8],
    ) -> Flow {
        if !self.check_password(token, opcode::HELLO, request_id, password) {
            return Flow::Stop;
        }
        if grace_ms > GRACE_MS_MAX {
            self.reply_status(
                token,
                opcode::HELLO,
                request_id,
                Status::BadBody,
                "grace_ms too long",
            );
            return Flow::Continue;
        }
        let secret = random_secret();
        let id = self
            .sessions
            .create(secret, grace_ms, client_name, token)
            .id;
        let conn = &mut self.conns[token.0];
        conn.session = Some(id);
        conn.hello_deadline_ms = 0;
        protocol::encode_session(
            self.wbuf(token),
            opcode::HELLO,
            request_id,
            id,
            &secret,
            grace_ms,
        );
        Flow::Continue
    }

    fn resume(
        &mut self,
        token: Token,
        request_id: u32,
        id: SessionId,
        secret: &[u8; SECRET_LEN],
        password: &[u8],
    ) -> Flow {
        if !self.check_password(token, opcode::RESUME, request_id, password) {
            return Flow::Stop;
        }
        let home = home_of(id);
        if home >= self.shared.peers.len() {
            self.reply_status(
                token,
                opcode::RESUME,
                request_id,
                Status::UnknownSession,
                "no such session",
            );
            return Flow::Continue;
        }
        if home != self.idx {
            return Flow::Migrate(home);
        }
        let known = self
            .sessions
            .get(id)
            .is_some_and(|s| secure_eq(&s.secret, secret));
        if !known {
            self.reply_status(
                token,
                opcode::RESUME,
                request_id,
                Status::UnknownSession,
                "no such session (ended, or wrong secret)",
            );
            return Flow::Continue;
        }
        if let Some(old) = self.sessions.attach(id, token) {
            // Taken over: the old connection loses the session and closes.
            if let Some(conn) = self.conns.get_mut(old.0) {
                conn.session = None;
                protocol::encode_push(&mut conn.wbuf, opcode::SESSION_TAKEN);
                self.start_closing(old);
            }
        }
        let session = self.sessions.get_mut(id).expect("attached above");
        let parked = std::mem::take(&mut session.parked);
        let grace_ms = session.grace_ms;
        let conn = &mut self.conns[token.0];
        conn.session = Some(id);
        conn.hello_deadline_ms = 0;
        let out = self.wbuf(token);
        protocol::encode_session(out, opcode::RESUME, request_id, id, secret, grace_ms);
        out.extend_from_slice(&parked);
        Flow::Continue
    }

    /// A request of an established session: admission checks, then to the shard.
    fn session_request(
        &mut self,
        token: Token,
        id: SessionId,
        request_id: RequestId,
        request: Request<'_>,
    ) {
        let op = request_opcode(&request);
        let session = self
            .sessions
            .get_mut(id)
            .expect("a connection's session lives at home");
        let refusal = if session.pending.contains_key(&request_id) {
            Some((Status::DuplicateRequestId, "request id already in flight"))
        } else if session.pending.len() >= IN_FLIGHT_PER_SESSION_MAX {
            Some((Status::TooManyInFlight, "too many requests in flight"))
        } else if op == opcode::ACQUIRE
            && session.holds + session.pending.len() >= HOLDS_PER_SESSION_MAX
        {
            Some((Status::TooManyHolds, "too many holds in this session"))
        } else {
            None
        };
        if let Some((status, message)) = refusal {
            self.reply_status(token, op, request_id, status, message);
            return;
        }
        let now_ms = self.now_ms;
        let (shard, command) = match request {
            Request::Acquire {
                name,
                mode,
                wait_ms,
                lease_ms,
                notify_queued,
            } => {
                let wait = match wait_ms {
                    0 => Wait::Try,
                    WAIT_FOREVER => Wait::Forever,
                    ms => Wait::Until(now_ms + u64::from(ms)),
                };
                let command = Command::Acquire(Acquire {
                    session: id,
                    request_id,
                    name,
                    mode,
                    wait,
                    lease_ms,
                    reentrant: false,
                    notify_queued,
                });
                (self.shard_of(name), command)
            }
            Request::Release { name } => (
                self.shard_of(name),
                Command::Release {
                    session: id,
                    request_id,
                    name,
                },
            ),
            Request::Extend { name, lease_ms } => (
                self.shard_of(name),
                Command::Extend {
                    session: id,
                    request_id,
                    name,
                    lease_ms,
                },
            ),
            Request::Cancel { target } => match session.pending.get(&target) {
                Some(p) if p.opcode == opcode::ACQUIRE => (
                    p.shard as usize,
                    Command::Cancel {
                        session: id,
                        request_id,
                        target,
                    },
                ),
                _ => {
                    self.reply_status(
                        token,
                        op,
                        request_id,
                        Status::NoSuchRequest,
                        "no such acquire in flight",
                    );
                    return;
                }
            },
            Request::Hello { .. } | Request::Resume { .. } | Request::Ping | Request::Bye => {
                unreachable!("handled by handle_native")
            }
        };
        let session = self.sessions.get_mut(id).expect("checked above");
        session.pending.insert(
            request_id,
            Pending {
                shard: shard as u8,
                opcode: op,
            },
        );
        session.touched |= 1 << shard;
        self.route_to_shard(shard, command);
    }

    fn shard_of(&self, name: &[u8]) -> usize {
        shard_for(name, self.shared.peers.len())
    }

    /// Applies `command` here if this loop owns `shard`, else sends it there.
    fn route_to_shard(&mut self, shard: usize, command: Command<'_>) {
        if shard == self.idx {
            self.table.apply(self.now_ms, command, &mut self.effects);
            self.route_effects();
        } else {
            self.outgoing[shard].push_back(Msg::Shard(ShardMsg::from_command(command)));
        }
    }

    /// Tells every shard the session touched that it is over.
    fn end_session(&mut self, session: Session) {
        let mut touched = session.touched;
        while touched != 0 {
            let shard = touched.trailing_zeros() as usize;
            touched &= touched - 1;
            self.route_to_shard(
                shard,
                Command::EndSession {
                    session: session.id,
                },
            );
        }
    }

    // ---- effects -----------------------------------------------------

    fn route_effects(&mut self) {
        let mut effects = std::mem::take(&mut self.effects);
        for effect in effects.drain(..) {
            let session = match &effect {
                Effect::Reply { session, .. } | Effect::LockLost { session, .. } => *session,
            };
            let home = home_of(session);
            if home == self.idx {
                self.deliver(effect);
            } else {
                self.outgoing[home].push_back(Msg::Effect(effect));
            }
        }
        self.effects = effects;
    }

    /// Writes an effect for one of this loop's sessions to its connection,
    /// or parks it while the session is detached.
    fn deliver(&mut self, effect: Effect) {
        let session_id = match &effect {
            Effect::Reply { session, .. } | Effect::LockLost { session, .. } => *session,
        };
        assert_eq!(
            home_of(session_id),
            self.idx,
            "effect routed to the wrong home"
        );
        // An ended session's late replies are dropped here.
        let Some(session) = self.sessions.get_mut(session_id) else {
            return;
        };
        let out: &mut Vec<u8> = match session.conn {
            Some(token) => {
                let conn = &mut self.conns[token.0];
                if !conn.dirty {
                    conn.dirty = true;
                    self.dirty.push(token);
                }
                &mut conn.wbuf
            }
            None => &mut session.parked,
        };
        match effect {
            Effect::Reply {
                request_id,
                outcome,
                deferred,
                ..
            } => {
                if outcome == Outcome::Queued {
                    protocol::encode_queued(out, request_id);
                    return;
                }
                let pending = session
                    .pending
                    .remove(&request_id)
                    .expect("a final reply answers a pending request");
                match (pending.opcode, outcome) {
                    (opcode::ACQUIRE, Outcome::Granted { token }) => {
                        session.holds += 1;
                        protocol::encode_granted(out, request_id, token, deferred);
                    }
                    (opcode::ACQUIRE, outcome) => protocol::encode_acquire_outcome(
                        out,
                        request_id,
                        outcome_status(outcome),
                        deferred,
                    ),
                    (op, outcome) => {
                        if op == opcode::RELEASE && outcome == Outcome::Ok {
                            session.holds -= 1;
                        }
                        protocol::encode_status(out, op, request_id, outcome_status(outcome), "");
                    }
                }
            }
            Effect::LockLost { token, name, .. } => {
                session.holds -= 1;
                protocol::encode_lock_lost(out, token, &name);
            }
        }
    }

    // ---- inbox, timers, outgoing --------------------------------------

    fn drain_inbox(&mut self) {
        for _ in 0..INBOX_PER_TURN_MAX {
            let Ok(msg) = self.inbox.try_recv() else {
                break;
            };
            match msg {
                Msg::Shard(shard_msg) => {
                    self.table
                        .apply(self.now_ms, shard_msg.as_command(), &mut self.effects);
                    self.route_effects();
                }
                Msg::Effect(effect) => self.deliver(effect),
                Msg::Adopt(adoption) => self.adopt(*adoption),
                Msg::Shutdown => self.begin_shutdown(),
            }
        }
    }

    fn fire_timers(&mut self) {
        let now_ms = self.now_ms;
        if self.table.next_deadline().is_some_and(|d| d <= now_ms) {
            self.table.tick(now_ms, &mut self.effects);
            self.route_effects();
        }
        if self.sessions.next_deadline().is_some_and(|d| d <= now_ms) {
            let mut ended = Vec::new();
            self.sessions.expire(now_ms, &mut ended);
            for session in ended {
                self.end_session(session);
            }
        }
        while let Some((&(deadline, key), _)) = self.hello_timers.first_key_value() {
            if deadline > now_ms {
                break;
            }
            self.hello_timers.remove(&(deadline, key));
            let token = Token(key);
            let late = self.conns.get(key).is_some_and(|c| {
                c.session.is_none() && c.hello_deadline_ms == deadline && !c.closing
            });
            if late {
                if self.conns[key].codec == Codec::Native {
                    self.reply_status(
                        token,
                        opcode::HELLO,
                        0,
                        Status::HelloTimeout,
                        "no HELLO in time",
                    );
                }
                self.start_closing(token);
            }
        }
    }

    fn send_outgoing(&mut self) {
        for (dest, queue) in self.outgoing.iter_mut().enumerate() {
            if queue.is_empty() {
                continue;
            }
            let peer = &self.shared.peers[dest];
            let mut sent = false;
            while let Some(msg) = queue.pop_front() {
                match peer.tx.try_send(msg) {
                    Ok(()) => sent = true,
                    Err(TrySendError::Full(msg)) => {
                        // Parked until the owner drains its inbox; reading
                        // sockets pauses while too much is parked.
                        queue.push_front(msg);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        // That loop has exited (shutdown): nothing to tell it.
                        queue.clear();
                        break;
                    }
                }
            }
            if sent {
                let _ = peer.waker.wake();
            }
        }
        self.parked_total = self.outgoing.iter().map(VecDeque::len).sum();
        if self.parked_total <= OUTBOX_PARK_MAX / 2 {
            for token in std::mem::take(&mut self.stalled) {
                self.mark_ready(token);
            }
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline_ms.is_some() {
            return;
        }
        self.shutdown_deadline_ms = Some(self.now_ms + SHUTDOWN_FLUSH_MS);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let tokens: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in tokens {
            let token = Token(key);
            if self.conns[key].codec == Codec::Native {
                protocol::encode_push(self.wbuf(token), opcode::SHUTDOWN);
            }
            self.start_closing(token);
        }
    }
}

fn request_opcode(request: &Request<'_>) -> u8 {
    match request {
        Request::Hello { .. } => opcode::HELLO,
        Request::Resume { .. } => opcode::RESUME,
        Request::Acquire { .. } => opcode::ACQUIRE,
        Request::Release { .. } => opcode::RELEASE,
        Request::Extend { .. } => opcode::EXTEND,
        Request::Cancel { .. } => opcode::CANCEL,
        Request::Ping => opcode::PING,
        Request::Bye => opcode::BYE,
    }
}

/// Opcode and request id of a frame whose header is complete.
fn header_ids(frame: &[u8]) -> (u8, u32) {
    use zerocopy::FromBytes;
    match protocol::Header::ref_from_prefix(frame) {
        Ok((header, _)) => (header.opcode, header.request_id.get()),
        Err(_) => (0, 0),
    }
}

fn outcome_status(outcome: Outcome) -> Status {
    match outcome {
        Outcome::Granted { .. } | Outcome::Ok => Status::Ok,
        Outcome::Queued => Status::Queued,
        Outcome::Busy => Status::Busy,
        Outcome::TimedOut => Status::TimedOut,
        Outcome::Cancelled => Status::Cancelled,
        Outcome::NotHeld => Status::NotHeld,
        Outcome::AlreadyHeld => Status::AlreadyHeld,
        Outcome::NoSuchRequest => Status::NoSuchRequest,
        Outcome::TooManyWaiters => Status::TooManyWaiters,
    }
}

fn random_secret() -> [u8; SECRET_LEN] {
    let mut secret = [0u8; SECRET_LEN];
    getrandom::getrandom(&mut secret).expect("the OS random source works");
    secret
}

/// TCP_NODELAY, keepalive and TCP_USER_TIMEOUT, so a dead peer is found fast.
fn tune_socket(stream: &TcpStream, config: &ServerConfig) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(config.tcp.keepalive_idle)
        .with_interval(config.tcp.keepalive_interval)
        .with_retries(config.tcp.keepalive_probes);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(config.tcp.user_timeout))?;
    Ok(())
}
