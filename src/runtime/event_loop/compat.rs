//! The LiveLock protocol on a connection (RESP arrays or inline lines, as
//! the Python `livelock` server speaks it): the PASS → CONN state machine,
//! client ids as sessions, and each verb turned into a lock-table command.
//!
//! Commands of one connection are answered strictly in order: while one is
//! at a shard (or gathering FIND/STATS from every shard), the connection's
//! next command waits (`Connection::awaiting`).
//!
//! A client id is a session whose home loop is `shard_for(client_id)`; CONN
//! moves the connection there. Several connections may share a client id;
//! the latest CONN's connection is the session's `conn`, and only its loss
//! starts the release grace (LIVELOCK_RELEASE_ALL_TIMEOUT).

use mio::Token;

use super::{EventLoop, Flow, Gather, GatherReply, Msg, Query};
use crate::connection::ConnRef;
use crate::limits::{
    CLIENT_ID_LEN_MAX, FIND_REPLY_BYTES_MAX, FIND_RESULTS_MAX, NAME_LEN_MAX, SIGNAL_LEN_MAX,
};
use crate::lock_table::{shard_for, Acquire, Command, Mode, Outcome, SessionId, SignalOp, Wait};
use crate::resp::{self, ErrorCode, StatValue, Verb};
use crate::session::{secure_eq, Ask, LockName, Pending, PendingOp, RespOp};

impl EventLoop {
    /// Decodes and handles the command at the front of `buf`: `None` when
    /// it is not complete yet (or the previous one is still being answered).
    pub(super) fn decode_resp(&mut self, token: Token, buf: &[u8]) -> Option<(usize, Flow)> {
        if self.conns[token.0].awaiting {
            return None;
        }
        // One byte of slack: the Python client sends up to max_payload + 1.
        match resp::decode(buf, self.shared.config.max_payload + 1) {
            Ok(resp::Decoded::Incomplete) => None,
            Ok(resp::Decoded::Empty { consumed }) => Some((consumed, Flow::Continue)),
            Ok(resp::Decoded::Command { consumed, args }) => {
                let flow = self.handle_resp(token, &args);
                let awaiting = self.conns.get(token.0).is_some_and(|c| c.awaiting);
                let flow = match flow {
                    Flow::Continue if awaiting => Flow::Stop,
                    flow => flow,
                };
                Some((consumed, flow))
            }
            Err(_) => {
                self.resp_error(token, ErrorCode::RespProtocol);
                self.start_closing(token);
                Some((0, Flow::Stop))
            }
        }
    }

    fn resp_error(&mut self, token: Token, code: ErrorCode) {
        resp::encode_error(self.wbuf(token), code);
    }

    fn resp_bool(&mut self, token: Token, value: bool) {
        resp::encode_bool(self.wbuf(token), value);
    }

    /// The state checks of server.py, in its order (see `resp::parse_command`).
    fn handle_resp(&mut self, token: Token, args: &resp::Args<'_>) -> Flow {
        let verb = args.get(0).and_then(resp::lookup_verb);
        let parsed = resp::parse_command(args);
        if self.frozen {
            self.resp_error(token, ErrorCode::ServerTerminating);
            return Flow::Continue;
        }
        if !self.conns[token.0].authed {
            let expected = self.shared.config.password.as_deref().unwrap_or(b"");
            return match parsed {
                Ok(resp::Command::Pass(password)) if secure_eq(expected, password) => {
                    self.conns[token.0].authed = true;
                    self.resp_bool(token, true);
                    Flow::Continue
                }
                _ => {
                    tracing::warn!(
                        peer = ?self.peer_of(token),
                        "authentication failed (LiveLock protocol): wrong or missing password"
                    );
                    // Nothing after a failed PASS is executed (server.py
                    // runs what was already buffered; that is a hole).
                    self.resp_error(token, ErrorCode::WrongPassword);
                    self.start_closing(token);
                    Flow::Stop
                }
            };
        }
        // A connection sharing a client id can outlive the id's session
        // (its latest connection went, and the grace ran out): it has no
        // session any more and must CONN again.
        let session = match self.conns[token.0].session {
            Some(id) if self.sessions.get(id).is_none() => {
                self.conns[token.0].session = None;
                None
            }
            session => session,
        };
        if verb == Some(Verb::Conn) {
            if session.is_some() {
                self.resp_error(token, ErrorCode::AlreadyHasClientId);
                return Flow::Continue;
            }
            return match parsed {
                Ok(resp::Command::Conn(client_id)) => self.resp_conn(token, client_id),
                Err(code) => {
                    self.resp_error(token, code);
                    Flow::Continue
                }
                Ok(_) => unreachable!("CONN parses as Conn"),
            };
        }
        let Some(session) = session else {
            self.resp_error(token, ErrorCode::ConnRequired);
            return Flow::Continue;
        };
        let command = match parsed {
            Ok(resp::Command::Pass(_)) | Err(ErrorCode::WrongPassword) => {
                // PASS when none was needed.
                self.resp_error(token, ErrorCode::UnknownCommand);
                return Flow::Continue;
            }
            Err(code) => {
                self.resp_error(token, code);
                return Flow::Continue;
            }
            Ok(command) => command,
        };
        match command {
            resp::Command::Ping => resp::encode_simple(self.wbuf(token), b"PONG"),
            resp::Command::ConnInfo(info) => {
                if let Some(s) = self.sessions.get_mut(session) {
                    let len = info.len().min(crate::limits::CLIENT_NAME_LEN_MAX);
                    s.client_name = info[..len].into();
                }
                self.resp_bool(token, true);
            }
            resp::Command::Aq(name) => {
                self.resp_lock_command(token, session, RespOp::Aq, name, b"")
            }
            resp::Command::Aqr(name) => {
                self.resp_lock_command(token, session, RespOp::Aqr, name, b"")
            }
            resp::Command::Release(name) => {
                self.resp_lock_command(token, session, RespOp::Release, name, b"")
            }
            resp::Command::Locked(name) => {
                self.resp_lock_command(token, session, RespOp::Locked, name, b"")
            }
            resp::Command::SigSet(name, signal) => {
                self.resp_signal(token, session, RespOp::SigSet, name, signal)
            }
            resp::Command::SigExists(name, signal) => {
                self.resp_signal(token, session, RespOp::SigExists, name, signal)
            }
            resp::Command::SigDel(name, signal) => {
                self.resp_signal(token, session, RespOp::SigDel, name, signal)
            }
            resp::Command::Find(pattern) => {
                self.conns[token.0].awaiting = true;
                let query = Query::Find {
                    pattern: pattern.into(),
                    limit: FIND_RESULTS_MAX,
                };
                self.start_query(token, session, GatherReply::Resp, query, None);
            }
            resp::Command::Stats => {
                self.conns[token.0].awaiting = true;
                self.start_query(token, session, GatherReply::Resp, Query::Stats, None);
            }
            resp::Command::Shutdown => {
                if self.shared.config.shutdown_support {
                    self.resp_bool(token, true);
                    // Through the outgoing queues, never a blocking send from
                    // a loop (its own inbox could be the full one).
                    for peer in 0..self.shared.peers.len() {
                        if peer != self.idx {
                            self.outgoing[peer].push_back(Msg::Freeze);
                        }
                    }
                    self.freeze();
                } else {
                    self.resp_error(token, ErrorCode::UnknownCommand);
                }
            }
            resp::Command::Pass(_) | resp::Command::Conn(_) => unreachable!("handled above"),
        }
        Flow::Continue
    }

    /// CONN [client_id]: adopt (or take back) the client id's session at its
    /// home loop, moving the connection there first.
    fn resp_conn(&mut self, token: Token, client_id: Option<&[u8]>) -> Flow {
        let loops = self.shared.peers.len();
        let generated;
        let client_id = match client_id {
            Some(id) if id.len() > CLIENT_ID_LEN_MAX => {
                self.resp_error(token, ErrorCode::WrongArgs);
                return Flow::Continue;
            }
            Some(id) => id,
            None => {
                // A fresh id homed here, so the connection need not move.
                generated = loop {
                    let id = uuid4();
                    if shard_for(id.as_bytes(), loops) == self.idx {
                        break id;
                    }
                };
                generated.as_bytes()
            }
        };
        let home = shard_for(client_id, loops);
        if home != self.idx {
            return Flow::Migrate(home);
        }
        let grace_ms =
            u32::try_from(self.shared.config.release_all_timeout.as_millis()).unwrap_or(u32::MAX);
        let id = match self.sessions.by_client(client_id) {
            Some(id) => {
                // Takes the client id's locks back (cancelling their grace);
                // this connection is now its latest one.
                self.sessions.attach(id, token);
                id
            }
            None => {
                if self.session_refusal(grace_ms > 0).is_some() || self.storage_failing() {
                    self.resp_error(token, ErrorCode::ServerError);
                    return Flow::Continue;
                }
                let id = self.sessions.create_client(client_id, grace_ms, token).id;
                self.journal_session_open(id);
                id
            }
        };
        let conn = &mut self.conns[token.0];
        conn.session = Some(id);
        conn.hello_deadline_ms = 0;
        resp::encode_simple(self.wbuf(token), client_id);
        Flow::Continue
    }

    fn resp_signal(
        &mut self,
        token: Token,
        session: SessionId,
        op: RespOp,
        name: &[u8],
        signal: &[u8],
    ) {
        // The limit applies to the signal as stored: lowercasing can make
        // it longer (`İ` is 2 bytes, its lowercase 3).
        let mut scratch = Vec::new();
        let signal = resp::lowercase_signal(signal, &mut scratch);
        if signal.len() > SIGNAL_LEN_MAX {
            self.resp_error(token, ErrorCode::WrongArgs);
            return;
        }
        self.resp_lock_command(token, session, op, name, signal);
    }

    /// Sends a LiveLock command on one lock to its shard; the reply comes
    /// back through `resp_reply`.
    fn resp_lock_command(
        &mut self,
        token: Token,
        session: SessionId,
        op: RespOp,
        name: &[u8],
        signal: &[u8],
    ) {
        if name.is_empty() || name.len() > NAME_LEN_MAX {
            self.resp_error(token, ErrorCode::WrongArgs);
            return;
        }
        let read = matches!(op, RespOp::Locked | RespOp::SigExists);
        if !read && self.storage_failing() {
            // The log cannot write: `-7 Server error`, as for any failure.
            self.resp_error(token, ErrorCode::ServerError);
            return;
        }
        let conn = self.conn_ref(token);
        let s = self
            .sessions
            .get_mut(session)
            .expect("a connection's session lives at home");
        // The session's bounds (ids are chosen below, never duplicates:
        // 0 is never one of them).
        let ask = match op {
            RespOp::Aq | RespOp::Aqr => Ask::Acquire(name),
            _ => Ask::Other,
        };
        if s.refusal(0, ask, (0, false)).is_some() {
            self.resp_error(token, ErrorCode::ServerError);
            return;
        }
        // Commands of one connection are sequential, so ids never collide
        // with each other; the counter skips ids still pending elsewhere.
        let mut request_id = (token.0 as u32).wrapping_mul(0x9E37_79B9) | 1;
        while s.pending.contains_key(&request_id) {
            request_id = request_id.wrapping_add(2);
        }
        let shard = shard_for(name, self.shared.peers.len());
        let command = match op {
            RespOp::Aq | RespOp::Aqr => Command::Acquire(Acquire {
                session,
                request_id,
                name,
                mode: Mode::Exclusive,
                weight: 1,
                capacity: 0,
                wait: Wait::Try,
                lease_ms: 0,
                reentrant: op == RespOp::Aqr,
                notify_queued: false,
            }),
            RespOp::Release => Command::Release {
                session,
                request_id,
                name,
                token: 0,
            },
            RespOp::Locked => Command::Locked {
                session,
                request_id,
                name,
            },
            RespOp::SigSet | RespOp::SigExists | RespOp::SigDel => Command::Signal {
                session,
                request_id,
                name,
                signal,
                op: match op {
                    RespOp::SigSet => SignalOp::Set { notify: true },
                    RespOp::SigExists => SignalOp::Exists,
                    _ => SignalOp::Delete,
                },
            },
        };
        s.pending.insert(
            request_id,
            Pending {
                shard: shard as u8,
                op: PendingOp::Resp(op),
                // AQ, AQR and RELEASE: the home keeps the session's holds.
                name: match op {
                    RespOp::Aq | RespOp::Aqr | RespOp::Release => LockName::from_slice(name),
                    _ => LockName::new(),
                },
                mode: Mode::Exclusive,
                notify_queued: false,
                queued: false,
                conn,
                started_us: self.now_us,
                multi: None,
            },
        );
        if matches!(op, RespOp::Aq | RespOp::Aqr) {
            self.metrics.inc_acquisitions();
        }
        self.touch(session, shard);
        self.conns[token.0].awaiting = true;
        self.route_to_shard(shard, command);
    }

    /// Writes the answer to a LiveLock command on the connection that sent
    /// it (if it is still there and still this client's), and lets that
    /// connection's next command go.
    pub(super) fn resp_reply(
        &mut self,
        conn: ConnRef,
        session: SessionId,
        op: RespOp,
        outcome: Outcome,
    ) {
        let Some(token) = self.live(conn) else {
            return;
        };
        let conn = &mut self.conns[token.0];
        if conn.session != Some(session) || !conn.awaiting {
            return;
        }
        conn.awaiting = false;
        match (op, outcome) {
            (_, Outcome::Granted { .. } | Outcome::Reentered { .. } | Outcome::Ok) => {
                self.resp_bool(token, true)
            }
            (_, Outcome::Bool(value)) => self.resp_bool(token, value),
            (_, Outcome::NoSuchLock) => self.resp_error(token, ErrorCode::KeyNotExists),
            (_, Outcome::Busy | Outcome::AlreadyHeld | Outcome::NotHeld) => {
                self.resp_bool(token, false)
            }
            (_, _) => self.resp_error(token, ErrorCode::ServerError),
        }
        self.mark_ready(token);
    }

    /// Answers a LiveLock command whose session ended while it was at a
    /// shard: whatever it got is released with the session.
    pub(super) fn resp_session_ended(&mut self, conn: ConnRef, session: SessionId, op: RespOp) {
        let Some(token) = self.live(conn) else {
            return;
        };
        let conn = &mut self.conns[token.0];
        if conn.session != Some(session) || !conn.awaiting {
            return;
        }
        conn.awaiting = false;
        conn.session = None;
        match op {
            RespOp::Aq | RespOp::Aqr | RespOp::Release => self.resp_bool(token, false),
            _ => self.resp_error(token, ErrorCode::ServerError),
        }
        self.mark_ready(token);
    }

    /// Writes a gathered FIND or STATS answer.
    pub(super) fn finish_resp_gather(&mut self, gather: Gather) {
        let Some(token) = self.live(gather.conn) else {
            return;
        };
        let conn = &mut self.conns[token.0];
        if conn.session != Some(gather.session) || !conn.awaiting {
            return;
        }
        conn.awaiting = false;
        if let Query::Find { .. } = gather.query {
            // At most FIND_REPLY_BYTES_MAX of items, so the reply always
            // fits the write buffer (the count goes first: items encoded aside).
            let mut items = Vec::new();
            let mut count = 0;
            for (name, since_ms) in &gather.found {
                let before = items.len();
                resp::encode_find_item(&mut items, name, *since_ms as f64 / 1000.0);
                if items.len() > FIND_REPLY_BYTES_MAX {
                    items.truncate(before);
                    break;
                }
                count += 1;
            }
            let out = self.wbuf(token);
            resp::encode_find_header(out, count);
            out.extend_from_slice(&items);
        } else {
            let dump_path = std::path::absolute(self.shared.config.dump_path())
                .unwrap_or_else(|_| self.shared.config.dump_path());
            let dump_path = dump_path.to_string_lossy().into_owned();
            let stats = gather.stats;
            let connections = self
                .shared
                .connections
                .load(std::sync::atomic::Ordering::Relaxed);
            resp::encode_map(
                self.wbuf(token),
                &[
                    ("lock_count", StatValue::Int(stats.locks as i64)),
                    ("dump_file_path", StatValue::Str(&dump_path)),
                    ("waiters", StatValue::Int(stats.waiters as i64)),
                    (
                        "sessions_attached",
                        StatValue::Int(stats.sessions_attached as i64),
                    ),
                    (
                        "sessions_detached",
                        StatValue::Int(stats.sessions_detached as i64),
                    ),
                    ("connections", StatValue::Int(connections as i64)),
                ],
            );
        }
        self.mark_ready(token);
    }
}

/// A random UUID version 4, lowercase, as Python's `str(uuid.uuid4())`.
fn uuid4() -> String {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).expect("the OS random source works");
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
