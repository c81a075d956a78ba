//! The native protocol on a connection: HELLO/RESUME and authentication,
//! admission of a session's requests (in-flight, duplicate ids, holds), and
//! turning lock-table outcomes into native reply frames.

use mio::Token;

use super::{header_ids, shown, unsent_frames, EventLoop, Flow, Gather, GatherReply, Query};
use crate::limits::{FIND_RESULTS_MAX, GRACE_MS_MAX, LIST_REPLY_BYTES_MAX};
use crate::lock_table::{Acquire, Command, Mode, Outcome, RequestId, SessionId, SignalOp, Wait};
use crate::metrics::Totals;
use crate::multi;
use crate::order::Order;
use crate::protocol::{
    self, opcode, Decoded, Fatal, Request, SignalKind, StatsReply, Status, SECRET_LEN, WAIT_FOREVER,
};
use crate::session::{
    home_of, random_secret, secure_eq, Ask, LockName, Pending, PendingOp, Refusal,
};

/// Why a change is refused while the log cannot write.
const STORAGE_FAILED: &str =
    "the log cannot be written (disk full or failing): changes are refused";

impl EventLoop {
    /// Writes the native reply to a gathered INSPECT, LIST or STATS.
    pub(super) fn finish_native_gather(&mut self, gather: Gather, op: u8, request_id: u32) {
        let micros = self.now_us.saturating_sub(gather.started_us);
        self.metrics.observe(super::native_op(op), micros);
        let connections = self
            .shared
            .connections
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut totals = Totals::default();
        for metrics in &self.shared.metrics {
            metrics.add_totals(&mut totals);
        }
        let (now_ms, uptime_ms) = (self.now_ms, self.shared.clock.uptime_ms());
        let Some(token) = self.live(gather.conn) else {
            return;
        };
        let out = self.wbuf(token);
        match gather.query {
            Query::Inspect { .. } => match gather.records.first() {
                Some((_, record)) => {
                    let start = protocol::begin_reply(out, op, request_id);
                    out.extend_from_slice(record);
                    protocol::end_reply(out, start);
                }
                None => protocol::encode_status(out, op, request_id, Status::NotHeld, ""),
            },
            Query::List { .. } => {
                let start = protocol::begin_reply(out, op, request_id);
                let counts_at = out.len();
                out.extend_from_slice(&[0; 16]);
                let mut count: u32 = 0;
                let mut truncated = gather.truncated;
                for (_, record) in &gather.records {
                    if out.len() - start + record.len() > LIST_REPLY_BYTES_MAX {
                        truncated = true;
                        break;
                    }
                    out.extend_from_slice(record);
                    count += 1;
                }
                out[counts_at..counts_at + 4].copy_from_slice(&count.to_le_bytes());
                out[counts_at + 4..counts_at + 8]
                    .copy_from_slice(&u32::from(truncated).to_le_bytes());
                out[counts_at + 8..counts_at + 16].copy_from_slice(&now_ms.to_le_bytes());
                protocol::end_reply(out, start);
            }
            Query::Stats => {
                let start = protocol::begin_reply(out, op, request_id);
                let stats = gather.stats;
                StatsReply {
                    locks: stats.locks,
                    waiters: stats.waiters,
                    sessions_attached: stats.sessions_attached,
                    sessions_detached: stats.sessions_detached,
                    connections: connections as u64,
                    uptime_ms,
                    server_unix_ms: now_ms,
                    acquisitions_total: totals.acquisitions,
                    grants_total: totals.grants,
                    releases_total: totals.releases,
                    timeouts_total: totals.timeouts,
                    busy_total: totals.busy,
                    locks_lost_total: totals.locks_lost,
                    connections_total: totals.connections_accepted,
                    version: env!("CARGO_PKG_VERSION").into(),
                }
                .put(out);
                protocol::end_reply(out, start);
            }
            Query::Report { tag, .. } => {
                let start = protocol::begin_reply(out, op, request_id);
                // With a tag filter, first the total of every name that matches.
                let total =
                    (!tag.is_empty()).then(|| super::report_row(&tag[..], &gather.report_total));
                let count = gather.report.len() + usize::from(total.is_some());
                let count = u32::try_from(count).expect("at most REPORT_TOP_MAX + 1");
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&now_ms.to_le_bytes());
                out.extend_from_slice(total.as_deref().unwrap_or_default());
                for (_, _, row) in &gather.report {
                    out.extend_from_slice(row);
                }
                protocol::end_reply(out, start);
            }
            Query::Kill { .. } => {
                let message = match gather.killed {
                    Status::Ok => "",
                    Status::UnknownSession => "no such session",
                    Status::StorageFailed => STORAGE_FAILED,
                    _ => "server is shutting down",
                };
                protocol::encode_status(out, op, request_id, gather.killed, message);
            }
            Query::Find { .. } => unreachable!("FIND is LiveLock's"),
        }
    }

    /// Decodes and handles the frame at the front of `buf`: `None` when it
    /// is not complete yet, else (bytes consumed, what next).
    pub(super) fn decode_native(&mut self, token: Token, buf: &[u8]) -> Option<(usize, Flow)> {
        match protocol::decode_request(buf) {
            Ok(Decoded::Incomplete) => None,
            Ok(Decoded::Frame {
                consumed,
                opcode,
                request_id,
                result,
            }) => {
                let flow = match result {
                    Ok(request) => self.handle_native(token, request_id, request),
                    Err(status) => {
                        self.reply_status(token, opcode, request_id, status, "");
                        Flow::Continue
                    }
                };
                Some((consumed, flow))
            }
            Err(fatal) => {
                // The stream cannot be delimited any more. A frame too large
                // still has a readable header, so say why first; bad magic
                // means the peer does not speak this protocol.
                if let Fatal::FrameTooLarge { .. } = fatal {
                    let (op, id) = header_ids(buf);
                    let message = "frame body too large";
                    self.reply_status(token, op, id, Status::FrameTooLarge, message);
                }
                self.start_closing(token);
                Some((0, Flow::Stop))
            }
        }
    }

    pub(super) fn reply_status(
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
        tracing::trace!(
            loop_idx = self.idx,
            conn = token.0,
            request_id,
            op = request.opcode(),
            "request"
        );
        // Requests answered in this turn count here (latency 0 at turn
        // granularity); those a shard or every shard answers count when
        // their reply goes out (`deliver`, `finish_native_gather`).
        if matches!(
            request,
            Request::Hello { .. }
                | Request::Resume { .. }
                | Request::Ping
                | Request::Bye
                | Request::ClusterStatus
                | Request::ClusterChange(_)
        ) {
            self.metrics.observe(super::native_op(request.opcode()), 0);
        }
        let session = self.conns[token.0].session;
        if self.frozen && !matches!(request, Request::Ping) {
            // Shutting down: the state is being exported; nothing changes.
            let op = request.opcode();
            let message = "server is shutting down";
            self.reply_status(token, op, request_id, Status::ShuttingDown, message);
            return Flow::Continue;
        }
        match (request, session) {
            (Request::Ping, session) => {
                let in_flight = session.is_some_and(|id| {
                    let queries = self.queries_of(id, request_id);
                    self.sessions.get(id).is_some_and(|s| {
                        s.refusal(request_id, Ask::Other, queries)
                            == Some(Refusal::DuplicateRequestId)
                    })
                });
                let (status, message) = match in_flight {
                    true => (Status::DuplicateRequestId, "request id already in flight"),
                    false => (Status::Ok, ""),
                };
                if self.storage_failing() {
                    // A PING reports no change: while the log fails it must
                    // not wait behind output held for the disk (`livelock
                    // run` takes 2 s without an answer as a cut connection).
                    self.status_now(token, opcode::PING, request_id, status, message);
                } else {
                    self.reply_status(token, opcode::PING, request_id, status, message);
                }
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
                let op = request.opcode();
                self.reply_status(token, op, request_id, Status::NoSession, "say HELLO first");
                Flow::Continue
            }
            (Request::ClusterStatus, Some(_)) => {
                let reply = self.shared.cluster_status();
                let out = self.wbuf(token);
                let start = protocol::begin_reply(out, opcode::CLUSTER_STATUS, request_id);
                reply.put(out);
                protocol::end_reply(out, start);
                Flow::Continue
            }
            (Request::ClusterChange(body), Some(id)) => {
                let change = protocol::ClusterChange::parse(body).expect("checked when decoded");
                tracing::warn!(
                    by_session = id,
                    ?change,
                    "cluster change asked by an operator"
                );
                let (status, message) = self.shared.cluster_change(change);
                self.reply_status(token, opcode::CLUSTER_CHANGE, request_id, status, message);
                Flow::Continue
            }
            (Request::Bye, Some(id)) => {
                if let Some(session) = self.sessions.remove(id) {
                    // Every request still in flight gets its one final
                    // reply: Cancelled, since the session ends with BYE and
                    // whatever it was granted is released with it. Queries
                    // being gathered (INSPECT, LIST, STATS) included.
                    let gathered: Vec<u64> = self
                        .gathers
                        .iter()
                        .filter(|(_, g)| g.session == id)
                        .map(|(&q, _)| q)
                        .collect();
                    let mut finals: Vec<(u32, u8)> = session
                        .pending
                        .iter()
                        .filter_map(|(&rid, p)| match p.op {
                            PendingOp::Native(op) => Some((rid, op)),
                            PendingOp::Resp(_) => None,
                        })
                        .collect();
                    for q in gathered {
                        if let Some(g) = self.gathers.remove(&q) {
                            if let GatherReply::Native { op, request_id } = g.reply {
                                finals.push((request_id, op));
                            }
                        }
                    }
                    finals.sort_unstable();
                    tracing::debug!(session = id, "session ended by BYE");
                    let out = self.wbuf(token);
                    for (pending_id, op) in finals {
                        encode_outcome(out, op, pending_id, Outcome::Cancelled, true);
                    }
                    self.end_session(session);
                }
                self.conns[token.0].session = None;
                self.reply_status(token, opcode::BYE, request_id, Status::Ok, "");
                self.start_closing(token);
                Flow::Stop
            }
            (request, Some(_)) if request.changes_state() && self.storage_failing() => {
                self.refuse_storage_failed(token, request.opcode(), request_id);
                Flow::Continue
            }
            (request, Some(id)) => {
                self.session_request(token, id, request_id, request);
                Flow::Continue
            }
        }
    }

    /// A change refused because the log cannot write: answered at once,
    /// whatever output of the connection waits for the log (`reply_now`).
    fn refuse_storage_failed(&mut self, token: Token, op: u8, request_id: u32) {
        self.status_now(token, op, request_id, Status::StorageFailed, STORAGE_FAILED);
    }

    /// A status reply that reports no change, sent ahead of held output.
    fn status_now(&mut self, token: Token, op: u8, request_id: u32, status: Status, message: &str) {
        let mut frame = Vec::new();
        protocol::encode_status(&mut frame, op, request_id, status, message);
        self.reply_now(token, &frame);
    }

    fn check_password(&mut self, token: Token, op: u8, request_id: u32, password: &[u8]) -> bool {
        let ok = match &self.shared.config.password {
            Some(expected) => secure_eq(expected, password),
            None => true,
        };
        if !ok {
            tracing::warn!(
                peer = ?self.peer_of(token),
                "authentication failed: wrong or missing password"
            );
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
        if let Some(message) = self.session_refusal(grace_ms > 0) {
            let op = opcode::HELLO;
            self.reply_status(token, op, request_id, Status::ServerBusy, message);
            return Flow::Continue;
        }
        if self.storage_failing() {
            self.refuse_storage_failed(token, opcode::HELLO, request_id);
            return Flow::Continue;
        }
        let secret = random_secret();
        let id = self
            .sessions
            .create(secret, grace_ms, client_name, token)
            .id;
        self.journal_session_open(id);
        tracing::debug!(
            session = id,
            client = %shown(client_name),
            grace_ms,
            peer = ?self.peer_of(token),
            "session opened"
        );
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
        let home = home_of(id, self.shared.peers.len());
        if home != self.idx {
            return Flow::Migrate(home);
        }
        let Some(resumed) = self.sessions.resume(id, secret, token) else {
            self.reply_status(
                token,
                opcode::RESUME,
                request_id,
                Status::UnknownSession,
                "no such session (ended, or wrong secret)",
            );
            return Flow::Continue;
        };
        tracing::debug!(session = id, peer = ?self.peer_of(token), "session resumed");
        let mut taken_over = Vec::new();
        if let Some(conn) = resumed.previous.and_then(|old| self.conns.get_mut(old.0)) {
            // Taken over: the old connection loses the session and closes;
            // what it had not started to send comes here instead.
            let (first, kept) = unsent_frames(conn);
            conn.wbuf.truncate(first);
            taken_over = kept;
            conn.session = None;
            protocol::encode_push(&mut conn.wbuf, opcode::SESSION_TAKEN);
            self.start_closing(resumed.previous.expect("checked"));
        }
        // The reply says which requests are still in flight; then come the
        // replies the old connection had not sent, and those parked while
        // detached; then the listing of every lock the session holds
        // (HELD ..., HELD_END), written as the connection drains
        // (`continue_replay`).
        let conn = &mut self.conns[token.0];
        conn.session = Some(id);
        conn.hello_deadline_ms = 0;
        let out = self.wbuf(token);
        let (grace_ms, in_flight) = (resumed.grace_ms, &resumed.in_flight);
        protocol::encode_resumed(out, request_id, id, secret, grace_ms, in_flight);
        out.extend_from_slice(&taken_over);
        out.extend_from_slice(&resumed.parked);
        self.continue_replay(token);
        Flow::Continue
    }

    /// The INSPECT/LIST/STATS of session `id` being answered: how many, and
    /// whether one of them uses `request_id` (for `Session::refusal`).
    fn queries_of(&self, id: SessionId, request_id: RequestId) -> (usize, bool) {
        let mut count = 0;
        let mut uses_id = false;
        for gather in self.gathers.values().filter(|g| g.session == id) {
            count += 1;
            uses_id |= matches!(gather.reply, GatherReply::Native { request_id: r, .. } if r == request_id);
        }
        (count, uses_id)
    }

    /// A request of an established session: admission checks, then to the shard.
    fn session_request(
        &mut self,
        token: Token,
        id: SessionId,
        request_id: RequestId,
        request: Request<'_>,
    ) {
        let op = request.opcode();
        let ask = match (&request, op) {
            (Request::Acquire { name, .. }, _) => Ask::Acquire(name),
            (Request::AcquireAll { names, .. }, _) => Ask::AcquireAll(multi::Request::All(*names)),
            (Request::AcquirePool { spec, .. }, _) => {
                if let Some(r) = spec.short_requirement() {
                    let message = format!(
                        "requirement {r}: its filter leaves fewer candidates than it needs"
                    );
                    // An outcome, not an error: its body says which.
                    let out = self.wbuf(token);
                    let (status, body) = (Status::OverCapacity, message.as_bytes());
                    protocol::encode_reply(out, op, false, status, request_id, body);
                    return;
                }
                Ask::AcquireAll(multi::Request::Pool(*spec))
            }
            (Request::Release { name, .. } | Request::Extend { name, .. }, _) => Ask::Held(name),
            (
                _,
                opcode::INSPECT
                | opcode::LIST
                | opcode::STATS
                | opcode::REPORT
                | opcode::KILL_SESSION,
            ) => Ask::Query,
            _ => Ask::Other,
        };
        let queries = self.queries_of(id, request_id);
        let session = self
            .sessions
            .get_mut(id)
            .expect("a connection's session lives at home");
        let (status, message) = match session.refusal(request_id, ask, queries) {
            None => (Status::Ok, ""),
            Some(Refusal::DuplicateRequestId) => {
                (Status::DuplicateRequestId, "request id already in flight")
            }
            Some(Refusal::TooManyInFlight) => {
                (Status::TooManyInFlight, "too many requests in flight")
            }
            Some(Refusal::TooManyQueries) => (
                Status::TooManyInFlight,
                "too many INSPECT/LIST/STATS in flight",
            ),
            Some(Refusal::TooManyHolds) => (Status::TooManyHolds, "too many holds in this session"),
            Some(Refusal::OrderViolation(name)) => {
                // An outcome, not an error: its body is the name it
                // conflicts with.
                let out = self.wbuf(token);
                protocol::encode_reply(out, op, false, Status::OrderViolation, request_id, &name);
                return;
            }
            // An outcome, not an error: no message.
            Some(Refusal::NotHeld) => (Status::NotHeld, ""),
            Some(Refusal::AlreadyHeld(_)) => {
                let out = self.wbuf(token);
                protocol::encode_acquire_outcome(out, op, request_id, Status::AlreadyHeld, false);
                return;
            }
        };
        if status != Status::Ok {
            self.reply_status(token, op, request_id, status, message);
            return;
        }
        let multi = match request {
            Request::AcquireAll {
                names,
                wait_ms,
                notify_queued,
            } => Some((multi::Request::All(names), wait_ms, notify_queued)),
            Request::AcquirePool {
                spec,
                wait_ms,
                notify_queued,
            } => Some((multi::Request::Pool(spec), wait_ms, notify_queued)),
            _ => None,
        };
        if let Some(asked) = multi {
            let conn = self.conn_ref(token);
            self.start_multi(id, request_id, asked, conn);
            return;
        }
        let now_ms = self.now_ms;
        // What the home remembers to keep the session's holds (`deliver`).
        let (pending_name, pending_mode, notify_queued): (&[u8], Mode, bool) = match request {
            Request::Acquire {
                name,
                mode,
                notify_queued,
                ..
            } => (name, mode, notify_queued),
            Request::Release { name, .. } => (name, Mode::Exclusive, false),
            _ => (b"", Mode::Exclusive, false),
        };
        let (shard, command) = match request {
            Request::Acquire {
                name,
                mode,
                weight,
                capacity,
                wait_ms,
                lease_ms,
                ..
            } => {
                let wait = match wait_ms {
                    0 => Wait::Try,
                    WAIT_FOREVER => Wait::Forever,
                    ms => Wait::Until(now_ms + u64::from(ms)),
                };
                self.metrics.inc_acquisitions();
                let command = Command::Acquire(Acquire {
                    session: id,
                    request_id,
                    name,
                    mode,
                    weight,
                    capacity,
                    wait,
                    lease_ms,
                    reentrant: false,
                    // Always: the home learns the request waits (`deliver`).
                    notify_queued: true,
                });
                (self.shard_of(name), command)
            }
            Request::Release { name, token } => (
                self.shard_of(name),
                Command::Release {
                    session: id,
                    request_id,
                    name,
                    token,
                },
            ),
            Request::Extend {
                name,
                lease_ms,
                token,
            } => (
                self.shard_of(name),
                Command::Extend {
                    session: id,
                    request_id,
                    name,
                    lease_ms,
                    token,
                },
            ),
            Request::SetCapacity { name, capacity } => (
                self.shard_of(name),
                Command::SetCapacity {
                    session: id,
                    request_id,
                    name,
                    capacity,
                },
            ),
            Request::Cancel { target } if session.cancel_multi(target).is_some() => {
                // An ACQUIRE_ALL is its home's: it ends the acquire in
                // flight (whichever shard it is on by now) and fails
                // Cancelled once what it took is given back.
                self.multi_step(id, target, crate::multi::Step::Abort);
                self.reply_status(token, op, request_id, Status::Ok, "");
                return;
            }
            Request::Cancel { target } => match session.pending.get(&target) {
                Some(p) if matches!(p.op, PendingOp::Native(op) if protocol::is_acquire(op)) => (
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
            Request::Signal { name, signal, op } => (
                self.shard_of(name),
                Command::Signal {
                    session: id,
                    request_id,
                    name,
                    signal,
                    op: match op {
                        SignalKind::Raise => SignalOp::Set { notify: true },
                        SignalKind::Exists => SignalOp::Exists,
                        SignalKind::Clear => SignalOp::Delete,
                    },
                },
            ),
            Request::Inspect { name } => {
                let reply = GatherReply::Native { op, request_id };
                let shard = self.shard_of(name);
                self.start_query(
                    token,
                    id,
                    reply,
                    Query::Inspect { name: name.into() },
                    Some(shard),
                );
                return;
            }
            Request::List { pattern, limit } => {
                let reply = GatherReply::Native { op, request_id };
                let limit = (limit as usize).min(FIND_RESULTS_MAX);
                let pattern: Box<[u8]> = if pattern.is_empty() {
                    Box::new(*b"*")
                } else {
                    pattern.into()
                };
                self.start_query(token, id, reply, Query::List { pattern, limit }, None);
                return;
            }
            Request::Stats => {
                let reply = GatherReply::Native { op, request_id };
                self.start_query(token, id, reply, Query::Stats, None);
                return;
            }
            Request::Report { top, tag } => {
                let reply = GatherReply::Native { op, request_id };
                let top = (top as usize).min(crate::limits::REPORT_TOP_MAX);
                let query = Query::Report {
                    top,
                    tag: tag.into(),
                };
                self.start_query(token, id, reply, query, None);
                return;
            }
            Request::ForceRelease { name, token } => {
                tracing::warn!(
                    by_session = id,
                    lock = %shown(name),
                    token,
                    "forced release requested by an operator"
                );
                (
                    self.shard_of(name),
                    Command::ForceRelease {
                        session: id,
                        request_id,
                        name,
                        token,
                    },
                )
            }
            Request::SetOrder(body) => {
                let (order, _) = Order::decode(body).expect("checked by the decoder");
                let session = self.sessions.get_mut(id).expect("checked above");
                let declared = session.set_order(order);
                if declared && self.shared.log.is_some() {
                    self.journal.session_order(id, session.order.as_ref());
                }
                let (status, message) = match declared {
                    true => (Status::Ok, ""),
                    false => (
                        Status::OrderViolation,
                        "declare the order before taking locks",
                    ),
                };
                self.reply_status(token, op, request_id, status, message);
                return;
            }
            Request::KillSession { session_id } => {
                tracing::warn!(
                    by_session = id,
                    session = session_id,
                    "kill-session requested"
                );
                let reply = GatherReply::Native { op, request_id };
                let home = home_of(session_id, self.shared.peers.len());
                let query = Query::Kill {
                    session: session_id,
                };
                self.start_query(token, id, reply, query, Some(home));
                return;
            }
            Request::AcquireAll { .. } | Request::AcquirePool { .. } => {
                unreachable!("started above")
            }
            Request::Hello { .. }
            | Request::Resume { .. }
            | Request::Ping
            | Request::Bye
            | Request::ClusterStatus
            | Request::ClusterChange(_) => {
                unreachable!("handled by handle_native")
            }
        };
        let conn = self.conn_ref(token);
        let session = self.sessions.get_mut(id).expect("checked above");
        session.pending.insert(
            request_id,
            Pending {
                shard: shard as u8,
                op: PendingOp::Native(op),
                name: LockName::from_slice(pending_name),
                mode: pending_mode,
                notify_queued,
                queued: false,
                conn,
                started_us: self.now_us,
                multi: None,
            },
        );
        self.touch(id, shard);
        self.route_to_shard(shard, command);
    }
}

/// Writes the final reply to a native request (`op`) with its outcome.
pub(super) fn encode_outcome(
    out: &mut Vec<u8>,
    op: u8,
    request_id: u32,
    outcome: Outcome,
    deferred: bool,
) {
    match (op, outcome) {
        (opcode::SIGNAL, Outcome::Bool(value)) => {
            let start = protocol::begin_reply(out, op, request_id);
            out.push(u8::from(value));
            protocol::end_reply(out, start);
        }
        (op, Outcome::Granted { token } | Outcome::Reentered { token })
            if protocol::is_acquire(op) =>
        {
            protocol::encode_granted(out, op, request_id, token, deferred)
        }
        (op, outcome) if protocol::is_acquire(op) => {
            let status = outcome_status(outcome);
            protocol::encode_acquire_outcome(out, op, request_id, status, deferred)
        }
        (op, outcome) => protocol::encode_status(out, op, request_id, outcome_status(outcome), ""),
    }
}

fn outcome_status(outcome: Outcome) -> Status {
    match outcome {
        Outcome::Granted { .. } | Outcome::Reentered { .. } | Outcome::Ok => Status::Ok,
        Outcome::Bool(true) => Status::Ok,
        Outcome::Bool(false) => Status::NotHeld,
        Outcome::Queued => Status::Queued,
        Outcome::Busy => Status::Busy,
        Outcome::TimedOut => Status::TimedOut,
        Outcome::Cancelled => Status::Cancelled,
        Outcome::NotHeld | Outcome::NoSuchLock => Status::NotHeld,
        Outcome::WrongToken => Status::WrongToken,
        Outcome::AlreadyHeld => Status::AlreadyHeld,
        Outcome::NoSuchRequest => Status::NoSuchRequest,
        Outcome::TooManyWaiters | Outcome::TooManySignals => Status::TooManyWaiters,
        Outcome::WrongKind => Status::WrongKind,
        Outcome::CapacityConflict => Status::CapacityConflict,
        Outcome::OverCapacity => Status::OverCapacity,
    }
}
