//! One load thread: a hand-rolled mio loop over its share of the connections.
//!
//! Every connection has `pipeline` *slots*; a slot is one request in flight
//! at a time and walks the cycle
//! `Idle -> Acquiring -> [Holding] -> Releasing -> Idle` (or
//! `Idle -> Pinging -> Idle`, or `Acquiring -> Retrying -> Acquiring` for a
//! client-side wait loop). Native replies are matched to slots by request id
//! (slot + 1); RESP replies come in order and are matched through a FIFO of
//! slot numbers.
//!
//! Each loop turn: poll; read every readable connection to `WouldBlock` and
//! act on each reply (queueing the next request into that connection's write
//! buffer); fire due timers (end of a hold, a retry, the open-loop schedule);
//! then write each dirty connection once. The clock is read once per turn.
//! Nothing is allocated per request: buffers are reused, names are written
//! into a scratch buffer, timers are FIFO queues (every hold lasts the same
//! time, every retry waits the same time, so they are already sorted).
//!
//! Invariants:
//! - the requests in flight on one connection name distinct keys (the server
//!   refuses a second acquire of a lock the same session holds or awaits);
//! - `Ctx::active` is the number of non-idle slots of live connections, so
//!   the drain at the end knows when nothing is outstanding;
//! - a hold is believed (in `Holders`) from the grant received to the release
//!   queued, never longer.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use livelock::protocol::{self, flags, opcode, DecodedReply, Mode, Request, Status, WAIT_FOREVER};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};

use crate::etcd;
use crate::holders::{Claim, Holders};
use crate::keys::{key_name, push_decimal, KeySampler, Rng};
use crate::report::{OpKind, Stats};
use crate::resp;
use crate::target::Proto;
use crate::timer::TimerFd;

/// Request id of the native HELLO (slots use 1..=pipeline).
const HELLO_ID: u32 = u32::MAX;
/// FIFO entry of a RESP handshake command (slots are 0..pipeline).
const HANDSHAKE: u16 = u16::MAX;
/// Bytes read per connection at most before replies are parsed; one native
/// frame (16 + 4096) or any RESP reply of ours fits many times over.
const READ_BUFFER_LEN: usize = 64 * 1024;
/// Longest a poll waits, so a stop (from another thread) is seen promptly.
const POLL_MAX: Duration = Duration::from_millis(50);
/// How long outstanding requests may take to finish after the stop.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Events taken per poll.
const EVENTS_MAX: usize = 1024;
const TIMER: Token = Token(usize::MAX - 1);

/// The Redis compare-and-delete release script (SCRIPT LOAD once per connection).
pub const RELEASE_SCRIPT: &str =
    "if redis.call(\"get\",KEYS[1]) == ARGV[1] then return redis.call(\"del\",KEYS[1]) else return 0 end";

const _: () = assert!((HANDSHAKE as usize) > livelock::limits::IN_FLIGHT_PER_SESSION_MAX);

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lock,
    Ping,
}

/// Acquire once, or wait (server-side on native, a retry loop on RESP targets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    Try,
    Wait,
}

/// The workload, fixed for the whole run, read by every thread.
#[derive(Debug, Clone)]
pub struct Plan {
    pub proto: Proto,
    pub addr: SocketAddr,
    /// The target's `HOST:PORT` as written (etcd: the HTTP `Host`).
    pub host: String,
    pub op: Op,
    pub wait: WaitMode,
    /// Longest wait of one acquire (`None`: forever).
    pub wait_ms: Option<u32>,
    /// Back-off between attempts of a client-side wait loop.
    pub retry: Duration,
    pub hold: Duration,
    /// Redis `PX` of every `SET`.
    pub ttl_ms: u64,
    pub shared_ratio: f64,
    /// livelock:// only: every acquire takes (weight, capacity) permits of
    /// a semaphore (ACQUIRE_PERMITS).
    pub permits: Option<(u32, u32)>,
    pub sampler: KeySampler,
    pub key_prefix: Vec<u8>,
    pub password: Option<Vec<u8>>,
    /// Speak TLS to the target (`--tls-ca`).
    pub tls: Option<livelock::client::TlsClient>,
    pub connections: usize,
    pub threads: usize,
    pub pipeline: usize,
    /// Open loop: target cycles/s over all connections (as given).
    pub rate: Option<f64>,
    /// Open loop: each connection starts a cycle every `interval`.
    pub interval: Option<Duration>,
    pub cycles_max: Option<u64>,
    pub warmup: Duration,
    pub duration: Duration,
    pub seed: u64,
    /// Time allowed for connecting and the handshake of every connection.
    pub setup_max: Duration,
}

/// Counters one thread publishes every turn for the progress line (all
/// operations, warm-up included). Padded so threads do not share a line.
#[derive(Default)]
#[repr(align(128))]
pub struct Progress {
    pub cycles: AtomicU64,
    pub ops: AtomicU64,
    pub busy: AtomicU64,
    pub errors: AtomicU64,
    pub violations: AtomicU64,
}

/// Setup rendezvous: every thread reports its connections ready (or not),
/// then waits for the common start instant (or an abort).
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    ready: usize,
    failure: Option<String>,
    /// `Some(Some(start))`: go; `Some(None)`: abort.
    go: Option<Option<Instant>>,
}

impl Gate {
    fn report(&self, result: Result<(), String>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.ready += 1;
        if let Err(e) = result {
            state.failure.get_or_insert(e);
        }
        self.cv.notify_all();
    }

    fn wait_go(&self) -> Option<Instant> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(go) = state.go {
                return go;
            }
            state = self.cv.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits (at most `max`) for `threads` reports; the first failure wins.
    pub fn wait_ready(&self, threads: usize, max: Duration) -> Result<(), String> {
        let deadline = Instant::now() + max;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.ready < threads && state.failure.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("connection setup did not finish in time".into());
            }
            state = self
                .cv
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.failure.clone().map_or(Ok(()), Err)
    }

    /// Starts every thread at `start`, or aborts them all (`None`).
    pub fn open(&self, start: Option<Instant>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.go = Some(start);
        self.cv.notify_all();
    }
}

/// State shared by all threads and the main thread.
pub struct Shared {
    pub plan: Plan,
    pub holders: Holders,
    /// Set when `--cycles` is reached (by any thread).
    pub stop: AtomicBool,
    /// Measured cycles of all threads, for `--cycles`.
    pub cycles_done: AtomicU64,
    pub progress: Box<[Progress]>,
    pub gate: Gate,
}

impl Shared {
    pub fn new(plan: Plan) -> Shared {
        let keys = match plan.op {
            Op::Lock => plan.sampler.keys(),
            Op::Ping => 0,
        };
        Shared {
            holders: Holders::new(keys),
            stop: AtomicBool::new(false),
            cycles_done: AtomicU64::new(0),
            progress: (0..plan.threads).map(|_| Progress::default()).collect(),
            gate: Gate::default(),
            plan,
        }
    }
}

/// What a thread hands back at the end.
pub struct ThreadReport {
    pub stats: Stats,
    /// When this thread saw the stop (end of its measured window).
    pub stopped_at: Instant,
    pub connections: usize,
    pub connections_lost: usize,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Acquiring,
    Holding,
    Releasing,
    Retrying,
    Pinging,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    state: State,
    key: u32,
    shared: bool,
    /// When the cycle was due to start: the intended send time under `--rate`,
    /// else the first send. Acquire and ping latency count from here.
    t_cycle: Instant,
    /// When the current request was queued (release latency).
    t_op: Instant,
    /// Client-side wait loop: when to give up (`--wait-ms`).
    give_up_at: Option<Instant>,
    /// Redis: this acquire's unique value (16 hex digits).
    token: [u8; 16],
}

struct Conn {
    /// Global connection number (also the id in `Holders`).
    id: u32,
    /// Index in this thread's `conns` (the mio token).
    local: u32,
    stream: TcpStream,
    /// The TLS session over `stream` (`--tls-ca`).
    tls: Option<Box<rustls::ClientConnection>>,
    alive: bool,
    rbuf: Box<[u8]>,
    rpos: usize,
    rlen: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Already in `Ctx::dirty` this turn.
    dirty: bool,
    /// Handshake replies still expected.
    handshake_left: u32,
    slots: Vec<Slot>,
    idle: Vec<u16>,
    /// RESP: slots (or `HANDSHAKE`) in the order their replies will come.
    fifo: VecDeque<u16>,
    /// Open loop: when this connection's next cycle is due.
    next_due: Instant,
    /// Redis: acquires so far (makes tokens unique).
    seq: u64,
    /// Redis: SHA1 of the release script, from SCRIPT LOAD.
    sha: [u8; 40],
    /// etcd: the lease the connection's locks are taken under, and each
    /// slot's lock key (as etcd answered it).
    lease: String,
    etcd_keys: Vec<String>,
}

/// How a reply ended a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Granted,
    Busy,
    TimedOut,
    Released,
    NotHeld,
    Pong,
    Error,
}

/// Everything a turn needs besides the connections themselves.
struct Ctx<'a> {
    shared: &'a Shared,
    plan: &'a Plan,
    thread: usize,
    now: Instant,
    /// Operations are counted in `stats` (after warm-up, before the stop).
    recording: bool,
    stopping: bool,
    /// When the stop was seen: the end of this thread's measured window.
    stopped_at: Option<Instant>,
    measure_start: Instant,
    rng: Rng,
    /// Scratch for lock names.
    name: Vec<u8>,
    /// Redis PX argument, formatted once.
    ttl: Vec<u8>,
    stats: Stats,
    /// Totals for the progress line, warm-up included.
    raw: Stats,
    hold_q: VecDeque<(Instant, u32, u16)>,
    retry_q: VecDeque<(Instant, u32, u16)>,
    dirty: Vec<u32>,
    active: usize,
    alive: usize,
    lost_conns: usize,
    first_error: Option<String>,
    /// Measured cycles already added to `Shared::cycles_done`.
    cycles_published: u64,
}

impl Ctx<'_> {
    fn note_error(&mut self, what: impl FnOnce() -> String) {
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }

    fn mark_dirty(&mut self, conn: &mut Conn) {
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(conn.local);
        }
    }

    fn latency_us(&self, since: Instant) -> u64 {
        self.now.saturating_duration_since(since).as_micros() as u64
    }

    /// Counts one completed operation (every reply to a slot's request).
    fn count_op(&mut self) {
        self.raw.ops += 1;
        if self.recording {
            self.stats.ops += 1;
        }
    }

    fn count_cycle(&mut self) {
        self.raw.cycles += 1;
        if self.recording {
            self.stats.cycles += 1;
        }
    }

    fn record(&mut self, op: OpKind, since: Instant) {
        if self.recording {
            let us = self.latency_us(since);
            self.stats.record(op, us);
        }
    }

    fn publish(&mut self) {
        let p = &self.shared.progress[self.thread];
        p.cycles.store(self.raw.cycles, Ordering::Relaxed);
        p.ops.store(self.raw.ops, Ordering::Relaxed);
        p.busy.store(self.raw.busy, Ordering::Relaxed);
        p.errors.store(self.raw.errors, Ordering::Relaxed);
        p.violations.store(self.raw.violations, Ordering::Relaxed);
        if let Some(max) = self.plan.cycles_max {
            let new = self.stats.cycles - self.cycles_published;
            if new > 0 {
                self.cycles_published = self.stats.cycles;
                let total = self.shared.cycles_done.fetch_add(new, Ordering::Relaxed) + new;
                if total >= max {
                    self.shared.stop.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Runs thread `thread` of the load: setup, rendezvous, load, drain.
/// Setup problems are reported through the gate (and returned).
pub fn run_thread(shared: &Shared, thread: usize) -> Result<ThreadReport, String> {
    let plan = &shared.plan;
    let mut poll = Poll::new().map_err(|e| format!("cannot create a poll: {e}"))?;
    let timer = match TimerFd::new(poll.registry(), TIMER) {
        Ok(timer) => timer,
        Err(e) => {
            let e = format!("cannot create a timerfd: {e}");
            shared.gate.report(Err(e.clone()));
            return Err(e);
        }
    };
    let now = Instant::now();
    let mut ttl = Vec::new();
    push_decimal(&mut ttl, plan.ttl_ms);
    let mut cx = Ctx {
        shared,
        plan,
        thread,
        now,
        recording: false,
        stopping: false,
        stopped_at: None,
        measure_start: now,
        rng: Rng::new(plan.seed ^ (thread as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        name: Vec::with_capacity(plan.key_prefix.len() + 20),
        ttl,
        stats: Stats::new(),
        raw: Stats::new(),
        hold_q: VecDeque::new(),
        retry_q: VecDeque::new(),
        dirty: Vec::new(),
        active: 0,
        alive: 0,
        lost_conns: 0,
        first_error: None,
        cycles_published: 0,
    };
    let mut conns = Vec::new();
    let mut events = Events::with_capacity(EVENTS_MAX);
    let setup = setup(&mut poll, &mut events, &mut conns, &mut cx);
    shared.gate.report(setup.clone());
    setup?;
    let Some(start) = shared.gate.wait_go() else {
        return Err("aborted".into());
    };
    let mut engine = Engine {
        poll,
        events,
        conns,
        timer,
        cx,
    };
    engine.run(start);
    let Engine { conns, cx, .. } = engine;
    Ok(ThreadReport {
        stopped_at: cx.stopped_at.unwrap_or(cx.now),
        stats: cx.stats,
        connections: conns.len(),
        connections_lost: cx.lost_conns,
        first_error: cx.first_error,
    })
}

/// Connects this thread's share of the connections (numbers `thread`,
/// `thread + threads`, ...) and completes every handshake.
fn setup(
    poll: &mut Poll,
    events: &mut Events,
    conns: &mut Vec<Conn>,
    cx: &mut Ctx<'_>,
) -> Result<(), String> {
    let plan = cx.plan;
    let deadline = Instant::now() + plan.setup_max;
    let ids = (cx.thread..plan.connections).step_by(plan.threads);
    for id in ids {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("connecting took too long".into());
        }
        let mut std_stream = std::net::TcpStream::connect_timeout(&plan.addr, left)
            .map_err(|e| format!("cannot connect to {}: {e}", plan.addr))?;
        let tls = match &plan.tls {
            Some(tls) => {
                // The handshake, blocking, before the socket joins the loop.
                let mut session = tls.session().map_err(|e| format!("TLS: {e}"))?;
                std_stream
                    .set_read_timeout(Some(left))
                    .map_err(|e| format!("cannot set up a socket: {e}"))?;
                while session.is_handshaking() {
                    session
                        .complete_io(&mut std_stream)
                        .map_err(|e| format!("TLS handshake with {}: {e}", plan.addr))?;
                }
                Some(Box::new(session))
            }
            None => None,
        };
        std_stream
            .set_nodelay(true)
            .and_then(|()| std_stream.set_nonblocking(true))
            .map_err(|e| format!("cannot set up a socket: {e}"))?;
        let mut stream = TcpStream::from_std(std_stream);
        let local = conns.len() as u32;
        poll.registry()
            .register(
                &mut stream,
                Token(local as usize),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("cannot register a socket: {e}"))?;
        let mut conn = Conn {
            id: id as u32,
            local,
            stream,
            tls,
            alive: true,
            rbuf: vec![0; READ_BUFFER_LEN].into_boxed_slice(),
            rpos: 0,
            rlen: 0,
            wbuf: Vec::with_capacity(4096),
            wpos: 0,
            dirty: false,
            handshake_left: 0,
            slots: vec![
                Slot {
                    state: State::Idle,
                    key: 0,
                    shared: false,
                    t_cycle: cx.now,
                    t_op: cx.now,
                    give_up_at: None,
                    token: [b'0'; 16],
                };
                plan.pipeline
            ],
            idle: (0..plan.pipeline as u16).rev().collect(),
            fifo: VecDeque::with_capacity(plan.pipeline + 2),
            next_due: cx.now,
            seq: 0,
            sha: [0; 40],
            lease: String::new(),
            etcd_keys: vec![String::new(); plan.pipeline],
        };
        send_handshake(&mut conn, cx);
        cx.alive += 1;
        conns.push(conn);
    }
    for conn in conns.iter_mut() {
        flush(conn).map_err(|e| format!("cannot send the handshake: {e}"))?;
    }
    cx.dirty.clear();
    while conns.iter().any(|c| c.handshake_left > 0) {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "no handshake reply from {} within {:?}",
                plan.addr, plan.setup_max
            ));
        }
        poll_once(poll, events, deadline - now).map_err(|e| format!("poll failed: {e}"))?;
        cx.now = Instant::now();
        for event in events.iter() {
            let Some(conn) = conns.get_mut(event.token().0) else {
                continue;
            };
            read(conn, cx).map_err(|e| format!("handshake with {} failed: {e}", plan.addr))?;
        }
        for conn in conns.iter_mut() {
            flush(conn).map_err(|e| format!("cannot send to {}: {e}", plan.addr))?;
        }
        cx.dirty.clear();
    }
    for conn in conns.iter_mut() {
        conn.dirty = false;
    }
    Ok(())
}

fn poll_once(poll: &mut Poll, events: &mut Events, timeout: Duration) -> io::Result<()> {
    match poll.poll(events, Some(timeout)) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        other => other,
    }
}

/// Queues the protocol's opening requests.
fn send_handshake(conn: &mut Conn, cx: &mut Ctx<'_>) {
    let password = cx.plan.password.as_deref();
    match cx.plan.proto {
        Proto::Native => {
            let hello = Request::Hello {
                grace_ms: 0,
                password: password.unwrap_or_default(),
                client_name: b"livelock-loadgen",
            };
            protocol::encode_request(&mut conn.wbuf, HELLO_ID, &hello);
            conn.handshake_left = 1;
        }
        Proto::LiveLockResp => {
            if let Some(pw) = password {
                resp::encode_command(&mut conn.wbuf, &[b"PASS", pw]);
                conn.fifo.push_back(HANDSHAKE);
            }
            resp::encode_command(&mut conn.wbuf, &[b"CONN"]);
            conn.fifo.push_back(HANDSHAKE);
        }
        Proto::Redis => {
            if let Some(pw) = password {
                resp::encode_command(&mut conn.wbuf, &[b"AUTH", pw]);
                conn.fifo.push_back(HANDSHAKE);
            }
            resp::encode_command(
                &mut conn.wbuf,
                &[b"SCRIPT", b"LOAD", RELEASE_SCRIPT.as_bytes()],
            );
            conn.fifo.push_back(HANDSHAKE);
        }
        Proto::Etcd => {
            etcd::encode_grant(&mut conn.wbuf, &cx.plan.host);
            conn.fifo.push_back(HANDSHAKE);
        }
    }
    if cx.plan.proto.in_order() {
        conn.handshake_left = conn.fifo.len() as u32;
    }
    cx.mark_dirty(conn);
}

struct Engine<'a> {
    poll: Poll,
    events: Events,
    conns: Vec<Conn>,
    timer: TimerFd,
    cx: Ctx<'a>,
}

impl Engine<'_> {
    fn run(&mut self, start: Instant) {
        let Engine {
            poll,
            events,
            conns,
            timer,
            cx,
        } = self;
        let plan = cx.plan;
        cx.now = Instant::now();
        cx.measure_start = start + plan.warmup;
        let end_at = cx.measure_start + plan.duration;
        let mut drain_until = end_at + DRAIN_MAX;
        cx.recording = cx.now >= cx.measure_start;
        if let Some(interval) = plan.interval {
            // Spread the connections' schedules over one interval.
            for conn in conns.iter_mut() {
                let phase = conn.id as f64 / plan.connections as f64;
                conn.next_due = start + interval.mul_f64(phase);
            }
        }
        for conn in conns.iter_mut() {
            refill(conn, cx);
        }
        flush_dirty(conns, cx, poll.registry());
        loop {
            // When to wake: the earliest timer, the schedule, the end.
            let mut next: Option<Instant> = cx.hold_q.front().map(|d| d.0);
            let mut consider = |at: Instant| {
                next = Some(next.map_or(at, |n| n.min(at)));
            };
            if let Some(&(at, _, _)) = cx.retry_q.front() {
                consider(at);
            }
            if plan.interval.is_some() && !cx.stopping {
                for conn in conns.iter().filter(|c| c.alive && !c.idle.is_empty()) {
                    consider(conn.next_due);
                }
            }
            let horizon = if cx.stopping { drain_until } else { end_at };
            let mut timeout = horizon.saturating_duration_since(cx.now).min(POLL_MAX);
            if let Some(at) = next {
                let now = Instant::now();
                if at <= now {
                    timeout = Duration::ZERO;
                } else if timer.arm(at, now).is_err() {
                    // No fine timer: fall back to the poll's millisecond timeout.
                    timeout = timeout.min(at - now);
                }
            }
            if let Err(e) = poll_once(poll, events, timeout) {
                cx.note_error(|| format!("poll failed: {e}"));
                break;
            }
            cx.now = Instant::now();
            if !cx.stopping && (cx.now >= end_at || cx.shared.stop.load(Ordering::Relaxed)) {
                begin_stop(conns, cx);
                drain_until = cx.now + DRAIN_MAX;
            }
            cx.recording = !cx.stopping && cx.now >= cx.measure_start;

            for event in events.iter() {
                if event.token() == TIMER {
                    timer.fired();
                    continue;
                }
                let Some(conn) = conns.get_mut(event.token().0) else {
                    continue;
                };
                if !conn.alive {
                    continue;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    if let Err(e) = read(conn, cx) {
                        kill(conn, cx, poll.registry(), &e);
                        continue;
                    }
                }
                if event.is_writable() {
                    cx.mark_dirty(conn);
                }
                refill(conn, cx);
            }
            fire_timers(conns, cx);
            if plan.interval.is_some() && !cx.stopping {
                for conn in conns.iter_mut() {
                    refill(conn, cx);
                }
            }
            flush_dirty(conns, cx, poll.registry());
            cx.publish();
            if cx.alive == 0 {
                break;
            }
            if cx.stopping && (cx.active == 0 || cx.now >= drain_until) {
                break;
            }
        }
        if !cx.stopping {
            // Every connection died before the end.
            cx.stopping = true;
            cx.stopped_at = Some(cx.now);
        }
        cx.publish();
    }
}

/// The run is over: no new cycles; holds are released now, client-side
/// waits abandoned; what is in flight may finish during the drain.
fn begin_stop(conns: &mut [Conn], cx: &mut Ctx<'_>) {
    cx.stopping = true;
    cx.stopped_at = Some(cx.now);
    cx.recording = false;
    for conn in conns.iter_mut().filter(|c| c.alive) {
        for slot in 0..conn.slots.len() {
            match conn.slots[slot].state {
                State::Holding => send_release(conn, cx, slot),
                State::Retrying => set_idle(conn, cx, slot),
                _ => {}
            }
        }
    }
    // Any queued entries are now stale (their slots changed state).
    cx.hold_q.clear();
    cx.retry_q.clear();
}

/// Ends holds whose time is up and re-sends due retries.
fn fire_timers(conns: &mut [Conn], cx: &mut Ctx<'_>) {
    while let Some(&(at, local, slot)) = cx.hold_q.front() {
        if at > cx.now {
            break;
        }
        cx.hold_q.pop_front();
        let conn = &mut conns[local as usize];
        if conn.alive && conn.slots[slot as usize].state == State::Holding {
            send_release(conn, cx, slot as usize);
        }
    }
    while let Some(&(at, local, slot)) = cx.retry_q.front() {
        if at > cx.now {
            break;
        }
        cx.retry_q.pop_front();
        let conn = &mut conns[local as usize];
        if conn.alive && conn.slots[slot as usize].state == State::Retrying {
            send_acquire(conn, cx, slot as usize);
        }
    }
}

/// Starts cycles on idle slots: at once (closed loop) or as the schedule
/// comes due (open loop; a late start keeps its intended time).
fn refill(conn: &mut Conn, cx: &mut Ctx<'_>) {
    if cx.stopping || !conn.alive || conn.handshake_left > 0 {
        return;
    }
    while let Some(&slot) = conn.idle.last() {
        let t_cycle = match cx.plan.interval {
            Some(interval) => {
                if conn.next_due > cx.now {
                    break;
                }
                let due = conn.next_due;
                conn.next_due += interval;
                due
            }
            None => cx.now,
        };
        conn.idle.pop();
        cx.active += 1;
        start_cycle(conn, cx, slot as usize, t_cycle);
    }
}

fn start_cycle(conn: &mut Conn, cx: &mut Ctx<'_>, slot: usize, t_cycle: Instant) {
    let plan = cx.plan;
    conn.slots[slot].t_cycle = t_cycle;
    match plan.op {
        Op::Ping => {
            conn.slots[slot].state = State::Pinging;
            conn.slots[slot].t_op = cx.now;
            match plan.proto {
                Proto::Native => {
                    protocol::encode_request(&mut conn.wbuf, slot as u32 + 1, &Request::Ping)
                }
                Proto::LiveLockResp | Proto::Redis => {
                    resp::encode_command(&mut conn.wbuf, &[b"PING"]);
                    conn.fifo.push_back(slot as u16);
                }
                Proto::Etcd => {
                    etcd::encode_health(&mut conn.wbuf, &plan.host);
                    conn.fifo.push_back(slot as u16);
                }
            }
            cx.mark_dirty(conn);
        }
        Op::Lock => {
            let key = pick_key(conn, cx, slot);
            let shared = plan.shared_ratio > 0.0 && cx.rng.next_f64() < plan.shared_ratio;
            let give_up_at = match (plan.proto, plan.wait, plan.wait_ms) {
                (Proto::Native, _, _) | (_, WaitMode::Try, _) | (_, _, None) => None,
                (_, WaitMode::Wait, Some(ms)) => Some(cx.now + Duration::from_millis(ms.into())),
            };
            let s = &mut conn.slots[slot];
            s.key = key;
            s.shared = shared;
            s.give_up_at = give_up_at;
            send_acquire(conn, cx, slot);
        }
    }
}

/// A key no other slot of this connection is using (the server would refuse
/// a second acquire of a lock this session holds or awaits). `keys >=
/// pipeline` is checked up front, so a free key always exists.
fn pick_key(conn: &Conn, cx: &mut Ctx<'_>, slot: usize) -> u32 {
    let in_use = |key: u32| {
        conn.slots
            .iter()
            .enumerate()
            .any(|(i, s)| i != slot && s.state != State::Idle && s.key == key)
    };
    let mut key = cx.plan.sampler.sample(&mut cx.rng);
    if conn.slots.len() == 1 {
        return key;
    }
    for _ in 0..8 {
        if !in_use(key) {
            return key;
        }
        key = cx.plan.sampler.sample(&mut cx.rng);
    }
    let keys = cx.plan.sampler.keys();
    while in_use(key) {
        key = if key + 1 == keys { 0 } else { key + 1 };
    }
    key
}

fn send_acquire(conn: &mut Conn, cx: &mut Ctx<'_>, slot: usize) {
    let plan = cx.plan;
    let s = &mut conn.slots[slot];
    s.state = State::Acquiring;
    s.t_op = cx.now;
    let (key, shared) = (s.key, s.shared);
    key_name(&mut cx.name, &plan.key_prefix, key);
    match plan.proto {
        Proto::Native => {
            let wait_ms = match plan.wait {
                WaitMode::Try => 0,
                WaitMode::Wait => plan.wait_ms.unwrap_or(WAIT_FOREVER),
            };
            let (mode, (weight, capacity)) = match plan.permits {
                Some(permits) => (Mode::Permits, permits),
                None if shared => (Mode::Shared, (1, 0)),
                None => (Mode::Exclusive, (1, 0)),
            };
            let request = Request::Acquire {
                name: &cx.name,
                mode,
                weight,
                capacity,
                wait_ms,
                lease_ms: 0,
                notify_queued: false,
            };
            protocol::encode_request(&mut conn.wbuf, slot as u32 + 1, &request);
        }
        Proto::LiveLockResp => {
            resp::encode_command(&mut conn.wbuf, &[b"AQ", &cx.name]);
            conn.fifo.push_back(slot as u16);
        }
        Proto::Redis => {
            conn.seq += 1;
            let unique = (u64::from(conn.id) << 40) | (conn.seq & ((1 << 40) - 1));
            write_hex(&mut conn.slots[slot].token, unique);
            let token = conn.slots[slot].token;
            resp::encode_command(
                &mut conn.wbuf,
                &[b"SET", &cx.name, &token, b"NX", b"PX", &cx.ttl],
            );
            conn.fifo.push_back(slot as u16);
        }
        Proto::Etcd => {
            etcd::encode_lock(&mut conn.wbuf, &plan.host, &cx.name, &conn.lease);
            conn.fifo.push_back(slot as u16);
        }
    }
    cx.mark_dirty(conn);
}

fn write_hex(out: &mut [u8; 16], value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = DIGITS[((value >> (60 - 4 * i)) & 0xF) as usize];
    }
}

fn send_release(conn: &mut Conn, cx: &mut Ctx<'_>, slot: usize) {
    let plan = cx.plan;
    let s = &mut conn.slots[slot];
    // The belief ends before the server can see the release.
    cx.shared
        .holders
        .release(s.key, conn.id, claim(plan, s.shared));
    s.state = State::Releasing;
    s.t_op = cx.now;
    key_name(&mut cx.name, &plan.key_prefix, s.key);
    match plan.proto {
        Proto::Native => {
            let request = Request::Release {
                name: &cx.name,
                token: 0,
            };
            protocol::encode_request(&mut conn.wbuf, slot as u32 + 1, &request);
        }
        Proto::LiveLockResp => {
            resp::encode_command(&mut conn.wbuf, &[b"RELEASE", &cx.name]);
            conn.fifo.push_back(slot as u16);
        }
        Proto::Redis => {
            let token = s.token;
            resp::encode_command(
                &mut conn.wbuf,
                &[b"EVALSHA", &conn.sha, b"1", &cx.name, &token],
            );
            conn.fifo.push_back(slot as u16);
        }
        Proto::Etcd => {
            etcd::encode_unlock(&mut conn.wbuf, &plan.host, &conn.etcd_keys[slot]);
            conn.fifo.push_back(slot as u16);
        }
    }
    cx.mark_dirty(conn);
}

fn set_idle(conn: &mut Conn, cx: &mut Ctx<'_>, slot: usize) {
    assert_ne!(conn.slots[slot].state, State::Idle);
    conn.slots[slot].state = State::Idle;
    conn.idle.push(slot as u16);
    cx.active -= 1;
}

/// How a slot holds its key: the plan's permits, or shared or exclusive.
fn claim(plan: &Plan, shared: bool) -> Claim {
    match plan.permits {
        Some((weight, capacity)) => Claim::Permits { weight, capacity },
        None if shared => Claim::Shared,
        None => Claim::Exclusive,
    }
}

/// Acts on the final reply to a slot's request.
fn on_outcome(
    conn: &mut Conn,
    cx: &mut Ctx<'_>,
    slot: usize,
    outcome: Outcome,
) -> Result<(), String> {
    let plan = cx.plan;
    let state = conn.slots[slot].state;
    cx.count_op();
    match (state, outcome) {
        (State::Acquiring, Outcome::Granted) => {
            let s = conn.slots[slot];
            cx.record(OpKind::Acquire, s.t_cycle);
            if !cx
                .shared
                .holders
                .grant(s.key, conn.id, claim(plan, s.shared))
            {
                cx.raw.violations += 1;
                cx.stats.violations += 1;
                let name = String::from_utf8_lossy(&plan.key_prefix).into_owned();
                cx.note_error(|| {
                    format!(
                        "violation: {name}{} granted while another connection held it",
                        s.key
                    )
                });
            }
            if plan.hold.is_zero() || cx.stopping {
                send_release(conn, cx, slot);
            } else {
                conn.slots[slot].state = State::Holding;
                cx.hold_q
                    .push_back((cx.now + plan.hold, conn.local, slot as u16));
            }
        }
        (State::Acquiring, Outcome::Busy) => {
            let s = conn.slots[slot];
            let retry = plan.wait == WaitMode::Wait && plan.proto != Proto::Native;
            if !retry {
                cx.raw.busy += 1;
                if cx.recording {
                    cx.stats.busy += 1;
                }
                cx.record(OpKind::Acquire, s.t_cycle);
                set_idle(conn, cx, slot);
            } else if cx.stopping {
                set_idle(conn, cx, slot);
            } else if s.give_up_at.is_some_and(|at| cx.now >= at) {
                cx.raw.timeouts += 1;
                if cx.recording {
                    cx.stats.timeouts += 1;
                }
                cx.record(OpKind::Acquire, s.t_cycle);
                set_idle(conn, cx, slot);
            } else {
                cx.raw.retries += 1;
                if cx.recording {
                    cx.stats.retries += 1;
                }
                conn.slots[slot].state = State::Retrying;
                cx.retry_q
                    .push_back((cx.now + plan.retry, conn.local, slot as u16));
            }
        }
        (State::Acquiring, Outcome::TimedOut) => {
            cx.raw.timeouts += 1;
            if cx.recording {
                cx.stats.timeouts += 1;
            }
            cx.record(OpKind::Acquire, conn.slots[slot].t_cycle);
            set_idle(conn, cx, slot);
        }
        (State::Releasing, Outcome::Released) => {
            cx.record(OpKind::Release, conn.slots[slot].t_op);
            cx.count_cycle();
            set_idle(conn, cx, slot);
        }
        (State::Releasing, Outcome::NotHeld) => {
            cx.raw.lost += 1;
            if cx.recording {
                cx.stats.lost += 1;
            }
            set_idle(conn, cx, slot);
        }
        (State::Pinging, Outcome::Pong) => {
            cx.record(OpKind::Ping, conn.slots[slot].t_cycle);
            cx.count_cycle();
            set_idle(conn, cx, slot);
        }
        (State::Acquiring | State::Releasing | State::Pinging, Outcome::Error) => {
            cx.raw.errors += 1;
            if cx.recording {
                cx.stats.errors += 1;
            }
            set_idle(conn, cx, slot);
        }
        (state, outcome) => {
            return Err(format!(
                "reply {outcome:?} does not fit request state {state:?} of slot {slot}"
            ));
        }
    }
    Ok(())
}

/// Reads to `WouldBlock`, acting on every complete reply.
fn read(conn: &mut Conn, cx: &mut Ctx<'_>) -> Result<(), String> {
    if let Some(session) = conn.tls.take() {
        return read_tls(conn, cx, session);
    }
    loop {
        compact(conn)?;
        match conn.stream.read(&mut conn.rbuf[conn.rlen..]) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => {
                let room = conn.rbuf.len() - conn.rlen;
                conn.rlen += n;
                parse(conn, cx)?;
                if n < room {
                    // A short read emptied the socket. With edge-triggered
                    // epoll (Linux), bytes arriving later raise a new event,
                    // so the read that would only say WouldBlock is skipped:
                    // one syscall less per reply at pipeline 1.
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Makes room at the end of the read buffer (the reply being read moves
/// to the front).
fn compact(conn: &mut Conn) -> Result<(), String> {
    if conn.rlen == conn.rbuf.len() {
        if conn.rpos == 0 {
            return Err("reply larger than the read buffer".into());
        }
        conn.rbuf.copy_within(conn.rpos..conn.rlen, 0);
        conn.rlen -= conn.rpos;
        conn.rpos = 0;
    }
    Ok(())
}

fn parse(conn: &mut Conn, cx: &mut Ctx<'_>) -> Result<(), String> {
    match cx.plan.proto {
        Proto::Native => parse_native(conn, cx)?,
        Proto::LiveLockResp | Proto::Redis => parse_resp(conn, cx)?,
        Proto::Etcd => parse_etcd(conn, cx)?,
    }
    if conn.rpos == conn.rlen {
        conn.rpos = 0;
        conn.rlen = 0;
    }
    Ok(())
}

/// `read` through TLS: records from the socket to `WouldBlock`, every
/// decrypted reply acted on. The session is put back unless the
/// connection fails.
fn read_tls(
    conn: &mut Conn,
    cx: &mut Ctx<'_>,
    mut session: Box<rustls::ClientConnection>,
) -> Result<(), String> {
    loop {
        let drained = match session.read_tls(&mut conn.stream) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => return Err(e.to_string()),
        };
        session
            .process_new_packets()
            .map_err(|e| format!("TLS: {e}"))?;
        loop {
            compact(conn)?;
            match session.reader().read(&mut conn.rbuf[conn.rlen..]) {
                Ok(0) => return Err("the server closed the TLS session".into()),
                Ok(n) => {
                    conn.rlen += n;
                    parse(conn, cx)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        if drained {
            conn.tls = Some(session);
            return Ok(());
        }
    }
}

fn parse_native(conn: &mut Conn, cx: &mut Ctx<'_>) -> Result<(), String> {
    loop {
        let (op, reply_flags, status, request_id) =
            match protocol::decode_reply(&conn.rbuf[conn.rpos..conn.rlen]) {
                Ok(DecodedReply::Incomplete) => return Ok(()),
                Err(e) => return Err(format!("bad frame from the server: {e}")),
                Ok(DecodedReply::Frame { consumed, reply }) => {
                    if status_is_failure(reply.opcode, reply.status) {
                        let message = String::from_utf8_lossy(reply.body);
                        if reply.request_id == HELLO_ID {
                            return Err(format!("HELLO refused: {}: {message}", reply.status));
                        }
                        cx.note_error(|| format!("server replied {}: {message}", reply.status));
                    }
                    conn.rpos += consumed;
                    (reply.opcode, reply.flags, reply.status, reply.request_id)
                }
            };
        if op >= opcode::LOCK_LOST {
            match op {
                opcode::LOCK_LOST => {
                    cx.raw.lost += 1;
                    if cx.recording {
                        cx.stats.lost += 1;
                    }
                }
                opcode::SHUTDOWN => return Err("the server is shutting down".into()),
                opcode::SESSION_TAKEN => return Err("session taken over".into()),
                _ => return Err(format!("unknown push opcode {op:#x}")),
            }
            continue;
        }
        if reply_flags & flags::INTERIM != 0 {
            continue;
        }
        if request_id == HELLO_ID {
            if op != opcode::HELLO || conn.handshake_left == 0 {
                return Err("unexpected HELLO reply".into());
            }
            conn.handshake_left -= 1;
            continue;
        }
        let slot = (request_id as usize).wrapping_sub(1);
        let Some(state) = conn.slots.get(slot).map(|s| s.state) else {
            return Err(format!("reply to unknown request id {request_id}"));
        };
        let expected = match state {
            State::Acquiring if cx.plan.permits.is_some() => opcode::ACQUIRE_PERMITS,
            State::Acquiring => opcode::ACQUIRE,
            State::Releasing => opcode::RELEASE,
            State::Pinging => opcode::PING,
            _ => {
                return Err(format!(
                    "reply to request id {request_id}, which is not in flight"
                ))
            }
        };
        if op != expected {
            return Err(format!(
                "reply opcode {op} to request id {request_id}, expected {expected}"
            ));
        }
        let outcome = match (op, status) {
            (op, Status::Ok) if protocol::is_acquire(op) => Outcome::Granted,
            (op, Status::Busy) if protocol::is_acquire(op) => Outcome::Busy,
            (op, Status::TimedOut) if protocol::is_acquire(op) => Outcome::TimedOut,
            (opcode::RELEASE, Status::Ok) => Outcome::Released,
            (opcode::RELEASE, Status::NotHeld) => Outcome::NotHeld,
            (opcode::PING, Status::Ok) => Outcome::Pong,
            _ => Outcome::Error,
        };
        on_outcome(conn, cx, slot, outcome)?;
    }
}

/// A status that is an error for this opcode (as opposed to an expected
/// outcome such as Busy, TimedOut or NotHeld).
fn status_is_failure(op: u8, status: Status) -> bool {
    let acquire_outcome = protocol::is_acquire(op)
        && matches!(status, Status::Busy | Status::TimedOut | Status::Queued);
    !(acquire_outcome
        || matches!(
            (op, status),
            (_, Status::Ok) | (opcode::RELEASE, Status::NotHeld)
        ))
}

fn parse_resp(conn: &mut Conn, cx: &mut Ctx<'_>) -> Result<(), String> {
    let proto = cx.plan.proto;
    loop {
        let (reply, used) = match resp::parse(&conn.rbuf[conn.rpos..conn.rlen]) {
            Ok(None) => return Ok(()),
            Ok(Some(parsed)) => parsed,
            Err(resp::BadReply(what)) => return Err(format!("bad reply from the server: {what}")),
        };
        let Some(entry) = conn.fifo.pop_front() else {
            return Err("reply to no request".into());
        };
        if entry == HANDSHAKE {
            match reply {
                resp::Reply::Simple(_) => {}
                resp::Reply::Bulk(Some(sha)) if proto == Proto::Redis && sha.len() == 40 => {
                    conn.sha.copy_from_slice(sha);
                }
                resp::Reply::Error(m) => {
                    return Err(format!("handshake refused: {}", String::from_utf8_lossy(m)))
                }
                other => return Err(format!("unexpected handshake reply {other:?}")),
            }
            conn.rpos += used;
            conn.handshake_left -= 1;
            continue;
        }
        let slot = entry as usize;
        let outcome = classify(proto, conn.slots[slot].state, reply);
        if outcome == Outcome::Error {
            match reply {
                resp::Reply::Error(m) => {
                    cx.note_error(|| format!("server replied {}", String::from_utf8_lossy(m)))
                }
                other => cx.note_error(|| format!("unexpected reply {other:?}")),
            }
        }
        conn.rpos += used;
        on_outcome(conn, cx, slot, outcome)?;
    }
}

/// etcd's HTTP replies, in the order of the requests.
fn parse_etcd(conn: &mut Conn, cx: &mut Ctx<'_>) -> Result<(), String> {
    loop {
        let Some((reply, used)) = etcd::parse(&conn.rbuf[conn.rpos..conn.rlen])? else {
            return Ok(());
        };
        let Some(entry) = conn.fifo.pop_front() else {
            return Err("reply to no request".into());
        };
        let body = || String::from_utf8_lossy(reply.body).into_owned();
        if entry == HANDSHAKE {
            match (reply.status, etcd::field(reply.body, "ID")) {
                (200, Some(lease)) => conn.lease = lease,
                _ => return Err(format!("lease grant refused: {} {}", reply.status, body())),
            }
            conn.rpos += used;
            conn.handshake_left -= 1;
            continue;
        }
        let slot = entry as usize;
        let outcome = match (conn.slots[slot].state, reply.status) {
            (State::Acquiring, 200) => match etcd::field(reply.body, "key") {
                Some(key) => {
                    conn.etcd_keys[slot] = key;
                    Outcome::Granted
                }
                None => Outcome::Error,
            },
            (State::Releasing, 200) => Outcome::Released,
            (State::Pinging, 200) => Outcome::Pong,
            _ => Outcome::Error,
        };
        if outcome == Outcome::Error {
            let status = reply.status;
            cx.note_error(|| format!("etcd answered {status}: {}", body()));
        }
        conn.rpos += used;
        on_outcome(conn, cx, slot, outcome)?;
    }
}

/// The outcome of a RESP reply to a slot in `state`.
fn classify(proto: Proto, state: State, reply: resp::Reply<'_>) -> Outcome {
    use resp::Reply::{Bulk, Int, Simple};
    match (proto, state, reply) {
        (Proto::LiveLockResp, State::Acquiring, Simple(b"1") | Int(1)) => Outcome::Granted,
        (Proto::LiveLockResp, State::Acquiring, Simple(b"0") | Int(0)) => Outcome::Busy,
        (Proto::LiveLockResp, State::Releasing, Simple(b"1") | Int(1)) => Outcome::Released,
        (Proto::LiveLockResp, State::Releasing, Simple(b"0") | Int(0)) => Outcome::NotHeld,
        (Proto::Redis, State::Acquiring, Simple(b"OK")) => Outcome::Granted,
        (Proto::Redis, State::Acquiring, Bulk(None)) => Outcome::Busy,
        (Proto::Redis, State::Releasing, Int(1)) => Outcome::Released,
        (Proto::Redis, State::Releasing, Int(0)) => Outcome::NotHeld,
        (_, State::Pinging, Simple(b"PONG")) => Outcome::Pong,
        _ => Outcome::Error,
    }
}

/// Writes until done or `WouldBlock`; the rest waits for a writable event.
fn flush(conn: &mut Conn) -> io::Result<()> {
    if let Some(session) = conn.tls.as_deref_mut() {
        loop {
            while conn.wpos < conn.wbuf.len() {
                match session.writer().write(&conn.wbuf[conn.wpos..])? {
                    0 => break,
                    n => conn.wpos += n,
                }
            }
            if !session.wants_write() {
                break;
            }
            match session.write_tls(&mut conn.stream) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    while conn.wpos < conn.wbuf.len() && conn.tls.is_none() {
        match conn.stream.write(&conn.wbuf[conn.wpos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => conn.wpos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if conn.wpos == conn.wbuf.len() {
        conn.wbuf.clear();
        conn.wpos = 0;
    }
    Ok(())
}

fn flush_dirty(conns: &mut [Conn], cx: &mut Ctx<'_>, registry: &Registry) {
    let mut i = 0;
    while i < cx.dirty.len() {
        let conn = &mut conns[cx.dirty[i] as usize];
        i += 1;
        conn.dirty = false;
        if !conn.alive {
            continue;
        }
        if let Err(e) = flush(conn) {
            kill(conn, cx, registry, &format!("write failed: {e}"));
        }
    }
    cx.dirty.clear();
}

/// A connection failed during the run: count it, forget its beliefs and
/// slots, and go on with the others.
fn kill(conn: &mut Conn, cx: &mut Ctx<'_>, registry: &Registry, why: &str) {
    assert!(conn.alive);
    conn.alive = false;
    let _ = registry.deregister(&mut conn.stream);
    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    cx.alive -= 1;
    cx.lost_conns += 1;
    cx.raw.errors += 1;
    cx.stats.errors += 1;
    let id = conn.id;
    cx.note_error(|| format!("connection {id}: {why}"));
    for slot in 0..conn.slots.len() {
        let s = conn.slots[slot];
        if s.state == State::Holding {
            cx.shared
                .holders
                .release(s.key, conn.id, claim(cx.plan, s.shared));
        }
        if s.state != State::Idle {
            set_idle(conn, cx, slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_tokens() {
        let mut out = [0u8; 16];
        write_hex(&mut out, 0x0123_4567_89ab_cdef);
        assert_eq!(&out, b"0123456789abcdef");
    }

    #[test]
    fn resp_classification() {
        use resp::Reply::*;
        let c = |proto, state, reply| classify(proto, state, reply);
        assert_eq!(
            c(Proto::Redis, State::Acquiring, Simple(b"OK")),
            Outcome::Granted
        );
        assert_eq!(c(Proto::Redis, State::Acquiring, Bulk(None)), Outcome::Busy);
        assert_eq!(c(Proto::Redis, State::Releasing, Int(0)), Outcome::NotHeld);
        assert_eq!(
            c(Proto::Redis, State::Releasing, Error(b"NOSCRIPT")),
            Outcome::Error
        );
        assert_eq!(
            c(Proto::LiveLockResp, State::Acquiring, Simple(b"0")),
            Outcome::Busy
        );
        assert_eq!(
            c(Proto::LiveLockResp, State::Releasing, Simple(b"1")),
            Outcome::Released
        );
        assert_eq!(
            c(Proto::LiveLockResp, State::Pinging, Simple(b"PONG")),
            Outcome::Pong
        );
        assert_eq!(
            c(Proto::LiveLockResp, State::Acquiring, Simple(b"OK")),
            Outcome::Error
        );
    }
}
