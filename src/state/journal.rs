//! The command log's contents and their replay, as pure code (no I/O, no
//! clock): what a loop turn changed, as records; and `Replay`, which puts a
//! snapshot and the records after it back together into the state they
//! describe.
//!
//! The server's state is one deterministic state machine: each loop's
//! shard (`LockTable`, changed only by `apply` and `tick` with the time
//! passed in) plus the durable part of the sessions (id, secret, client
//! name and id, grace). A loop writes, in the order it makes them, every
//! change to that state as a record stamped with the time it used:
//!
//! - `Shard(now, command)`: a lock-table command that changes the table
//!   (reads are not logged; a read that fires due deadlines logs a `Tick`);
//! - `Tick(now)`: the table's timers fired at `now` (wait timeouts, leases);
//! - `SessionOpen(session)` and `SessionEnd(id)`.
//!
//! Everything else the loops keep (connections, which session is attached,
//! replies in flight, the home's copy of each session's holds) is derived
//! or dies with the process; on a restart every session comes back
//! detached and its holds and queued acquires come from the shards
//! (`snapshot::restore`).
//!
//! A loop turn's records go into the log as one *batch* framed
//! `loop u16, batch u64, len u32, records`; a log entry holds any number of
//! batches of any loops (group commit). Batches of one loop are in the
//! order the loop made them, which is all replay needs: a loop's state
//! depends only on its own records (a message from another loop that
//! changes it is logged by the receiver as a command).
//!
//! In a cluster, each leader's first entry is a *base*: `0xFFFF` (no loop
//! has that index) and the dump of the state it starts from (`base_entry`),
//! loops at batch 0. A node that replays the log replaces its state with
//! the base (`Replay::apply_committed`), so a log is self-describing from
//! any base on, whichever node wrote it.
//!
//! Record layout (little-endian; `bytes` = u16 length + bytes):
//! ```text
//! 1 Acquire     now u64, session u64, request u32, mode u8 (0 exclusive,
//!               1 shared, 2 permits + weight u32, capacity u32), wait u8
//!               (0 try, 1 until, 2 forever), deadline u64, lease u32,
//!               flags u8 (1 reentrant, 2 notify_queued), name bytes
//! 2 Release     now, session, request, token u64, name bytes
//! 3 Extend      now, session, request, lease u32, token u64, name bytes
//! 4 Cancel      now, session, request, target u32
//! 5 EndSession  now, session
//! 6 Introduce   now, session, client_name bytes
//! 7 Signal      now, session, request, op u8 (0 set, 1 set+notify,
//!               2 delete), name bytes, signal bytes
//! 8 Tick        now
//! 9 SessionOpen id u64, secret [16], grace u32, client_name bytes,
//!               client_id u8 (0 none | 1 + bytes)
//! 10 SessionEnd id u64
//! 11 ForceRelease now, session, request, token u64 (0 = every hold), name bytes
//! 12 SetCapacity now, session, request, capacity u32, name bytes
//! 13 SessionOrder id u64, the order (`order::Order::encode`)
//! 14 FailWaiter  now, session, request, cycle bytes
//! 15 SessionMulti now, id u64, request u32, u8 0 = ended | 1 = begun +
//!               wait u8 + deadline u64 (as Acquire), name count u16,
//!               names bytes (`protocol::AllNames`)
//! ```
//! Decoding never panics: a record that does not parse, names a loop the
//! snapshot does not have, or a lock of another shard is an error.

use std::collections::BTreeMap;

use crate::dump::{self, Dump, DumpMulti, DumpSession, LogPosition, LoopPosition};
use crate::limits::{IN_FLIGHT_PER_SESSION_MAX, SECRET_LEN};
use crate::lock_table::{shard_for, Acquire, Command, Effect, LockTable, Mode, SignalOp, Wait};
use crate::multi::{self, Multi};
use crate::order::Order;
use crate::session::home_of;
use crate::snapshot;

const ACQUIRE: u8 = 1;
const RELEASE: u8 = 2;
const EXTEND: u8 = 3;
const CANCEL: u8 = 4;
const END_SESSION: u8 = 5;
const INTRODUCE: u8 = 6;
const SIGNAL: u8 = 7;
const TICK: u8 = 8;
const SESSION_OPEN: u8 = 9;
const SESSION_END: u8 = 10;
const FORCE_RELEASE: u8 = 11;
const SET_CAPACITY: u8 = 12;
const SESSION_ORDER: u8 = 13;
const FAIL_WAITER: u8 = 14;
const SESSION_MULTI: u8 = 15;

/// Bytes of a batch's frame header: loop u16, batch u64, len u32.
pub const BATCH_HEADER_LEN: usize = 2 + 8 + 4;

/// Whether `command` changes the table (else it is a read, not logged).
pub fn changes_state(command: &Command<'_>) -> bool {
    match command {
        Command::Locked { .. } | Command::Tag { .. } => false,
        Command::Signal { op, .. } => *op != SignalOp::Exists,
        _ => true,
    }
}

/// One loop's records of the current turn, encoded as they are made.
#[derive(Debug, Default)]
pub struct Journal {
    records: Vec<u8>,
    /// Batches this loop has handed to the log (the next one is `batches + 1`).
    batches: u64,
}

impl Journal {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The last batch handed over (0: none yet).
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Records a lock-table command applied at `now_ms` (reads are skipped).
    pub fn shard(&mut self, now_ms: u64, command: &Command<'_>) {
        if changes_state(command) {
            encode_command(&mut self.records, now_ms, command);
        }
    }

    /// Records that the table's due deadlines fired at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) {
        self.records.push(TICK);
        self.records.extend_from_slice(&now_ms.to_le_bytes());
    }

    pub fn session_open(&mut self, session: &DumpSession) {
        let out = &mut self.records;
        out.push(SESSION_OPEN);
        out.extend_from_slice(&session.id.to_le_bytes());
        out.extend_from_slice(&session.secret);
        out.extend_from_slice(&session.grace_ms.to_le_bytes());
        put_bytes(out, &session.client_name);
        match &session.client_id {
            None => out.push(0),
            Some(id) => {
                out.push(1);
                put_bytes(out, id);
            }
        }
    }

    /// The session declared the order its acquires keep (SET_ORDER).
    pub fn session_order(&mut self, id: u64, order: Option<&Order>) {
        self.records.push(SESSION_ORDER);
        self.records.extend_from_slice(&id.to_le_bytes());
        Order::encode(order, &mut self.records);
    }

    /// An ACQUIRE_ALL or ACQUIRE_POOL of the session began (`Some`: what
    /// it asks and its wait)
    /// or ended (granted or failed).
    pub fn session_multi(&mut self, now_ms: u64, id: u64, request_id: u32, begun: Option<&Multi>) {
        let out = &mut self.records;
        out.push(SESSION_MULTI);
        out.extend_from_slice(&now_ms.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&request_id.to_le_bytes());
        match begun {
            None => out.push(0),
            Some(multi) => {
                out.push(1);
                put_wait(out, multi.wait());
                let (count, names) = multi.encoded();
                out.extend_from_slice(&count.to_le_bytes());
                put_bytes(out, names);
            }
        }
    }

    pub fn session_end(&mut self, id: u64) {
        self.records.push(SESSION_END);
        self.records.extend_from_slice(&id.to_le_bytes());
    }

    /// Appends this turn's records as the next batch of loop `idx` to `out`
    /// (nothing if there are none); returns whether it did.
    pub fn take_batch(&mut self, idx: usize, out: &mut Vec<u8>) -> bool {
        if self.records.is_empty() {
            return false;
        }
        self.batches += 1;
        out.extend_from_slice(&(idx as u16).to_le_bytes());
        out.extend_from_slice(&self.batches.to_le_bytes());
        out.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.records);
        self.records.clear();
        if self.records.capacity() > 1 << 20 {
            self.records = Vec::new();
        }
        true
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every name, signal and client name the server accepts is far shorter.
    let len = u16::try_from(bytes.len()).expect("logged byte string under 64 KiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A wait: kind u8 (0 try, 1 until, 2 forever), deadline u64.
fn put_wait(out: &mut Vec<u8>, wait: Wait) {
    let (kind, deadline) = match wait {
        Wait::Try => (0, 0),
        Wait::Until(at) => (1, at),
        Wait::Forever => (2, 0),
    };
    out.push(kind);
    out.extend_from_slice(&deadline.to_le_bytes());
}

fn encode_command(out: &mut Vec<u8>, now_ms: u64, command: &Command<'_>) {
    let head = |out: &mut Vec<u8>, tag: u8, session: u64| {
        out.push(tag);
        out.extend_from_slice(&now_ms.to_le_bytes());
        out.extend_from_slice(&session.to_le_bytes());
    };
    match *command {
        Command::Acquire(a) => {
            head(out, ACQUIRE, a.session);
            out.extend_from_slice(&a.request_id.to_le_bytes());
            out.push(a.mode as u8);
            if a.mode == Mode::Permits {
                out.extend_from_slice(&a.weight.to_le_bytes());
                out.extend_from_slice(&a.capacity.to_le_bytes());
            }
            put_wait(out, a.wait);
            out.extend_from_slice(&a.lease_ms.to_le_bytes());
            out.push(u8::from(a.reentrant) | u8::from(a.notify_queued) << 1);
            put_bytes(out, a.name);
        }
        Command::Release {
            session,
            request_id,
            name,
            token,
        }
        | Command::ForceRelease {
            session,
            request_id,
            name,
            token,
        } => {
            let tag = match command {
                Command::Release { .. } => RELEASE,
                _ => FORCE_RELEASE,
            };
            head(out, tag, session);
            out.extend_from_slice(&request_id.to_le_bytes());
            out.extend_from_slice(&token.to_le_bytes());
            put_bytes(out, name);
        }
        Command::Extend {
            session,
            request_id,
            name,
            lease_ms,
            token,
        } => {
            head(out, EXTEND, session);
            out.extend_from_slice(&request_id.to_le_bytes());
            out.extend_from_slice(&lease_ms.to_le_bytes());
            out.extend_from_slice(&token.to_le_bytes());
            put_bytes(out, name);
        }
        Command::Cancel {
            session,
            request_id,
            target,
        } => {
            head(out, CANCEL, session);
            out.extend_from_slice(&request_id.to_le_bytes());
            out.extend_from_slice(&target.to_le_bytes());
        }
        Command::EndSession { session } => head(out, END_SESSION, session),
        Command::Introduce {
            session,
            client_name,
        } => {
            head(out, INTRODUCE, session);
            put_bytes(out, client_name);
        }
        Command::Signal {
            session,
            request_id,
            name,
            signal,
            op,
        } => {
            head(out, SIGNAL, session);
            out.extend_from_slice(&request_id.to_le_bytes());
            out.push(match op {
                SignalOp::Set { notify: false } => 0,
                SignalOp::Set { notify: true } => 1,
                SignalOp::Delete => 2,
                SignalOp::Exists => unreachable!("reads are not logged"),
            });
            put_bytes(out, name);
            put_bytes(out, signal);
        }
        Command::SetCapacity {
            session,
            request_id,
            name,
            capacity,
        } => {
            head(out, SET_CAPACITY, session);
            out.extend_from_slice(&request_id.to_le_bytes());
            out.extend_from_slice(&capacity.to_le_bytes());
            put_bytes(out, name);
        }
        Command::FailWaiter {
            session,
            request_id,
            cycle,
        } => {
            head(out, FAIL_WAITER, session);
            out.extend_from_slice(&request_id.to_le_bytes());
            put_bytes(out, cycle);
        }
        Command::Locked { .. } | Command::Tag { .. } => {
            unreachable!("reads and observations are not logged")
        }
    }
}

/// Why the log could not be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayError(pub String);

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn corrupt(why: &str) -> ReplayError {
    ReplayError(format!("log record is corrupt: {why}"))
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReplayError> {
        if self.rest.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ReplayError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ReplayError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, ReplayError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ReplayError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn wait(&mut self) -> Result<Wait, ReplayError> {
        let kind = self.u8()?;
        let deadline = self.u64()?;
        match kind {
            0 => Ok(Wait::Try),
            1 => Ok(Wait::Until(deadline)),
            2 => Ok(Wait::Forever),
            _ => Err(corrupt("bad wait")),
        }
    }
    fn bytes(&mut self) -> Result<&'a [u8], ReplayError> {
        let len = self.u16()? as usize;
        self.take(len)
    }
    fn name(&mut self) -> Result<&'a [u8], ReplayError> {
        let name = self.bytes()?;
        if name.is_empty() || name.len() > crate::limits::NAME_LEN_MAX {
            return Err(corrupt("lock name length out of range"));
        }
        Ok(name)
    }
}

/// How a base entry starts: a batch starts with its loop's index, always
/// less.
const BASE_MARK: [u8; 2] = [0xFF, 0xFF];
const _: () = assert!(crate::limits::THREADS_MAX < 0xFFFF);

/// A base entry: `state` (a snapshot with every loop at batch 0) as the
/// start of a new leader's log.
pub fn base_entry(state: &Dump) -> Vec<u8> {
    let mut data = BASE_MARK.to_vec();
    data.extend_from_slice(&crate::dump::encode(state));
    data
}

/// The state a snapshot and the log after it describe, rebuilt record by
/// record: one table per loop of the server that wrote the log, and the
/// sessions. `finish` turns it into the dump a restart restores.
pub struct Replay {
    tables: Vec<LockTable>,
    sessions: BTreeMap<u64, DumpSession>,
    /// The waits of the sessions' multi-locks in flight (on their home
    /// loop's clock), by (session, request): `DumpSession::multis` holds
    /// their names, and the wait left once a snapshot is taken.
    multi_waits: BTreeMap<(u64, u32), Wait>,
    positions: Vec<LoopPosition>,
    /// The log index the snapshot covers (entries up to it are skipped).
    index: u64,
    sink: Vec<Effect>,
    /// Batches applied (for the start-up report).
    pub batches: u64,
}

impl Replay {
    /// Starts from `base`, which must carry a log position (a snapshot of
    /// `--durability log`): each loop's part goes back into its own table
    /// as it was at that loop's stamp.
    pub fn from_snapshot(base: &Dump) -> Result<Replay, ReplayError> {
        let log = base
            .log
            .as_ref()
            .ok_or_else(|| ReplayError("the snapshot has no log position".into()))?;
        let loops = log.loops.len();
        let mut tables: Vec<LockTable> = (0..loops).map(|i| LockTable::new(i, loops)).collect();
        let sessions: BTreeMap<u64, DumpSession> =
            base.sessions.iter().map(|s| (s.id, s.clone())).collect();
        let mut multi_waits = BTreeMap::new();
        for session in &base.sessions {
            let stamp = log.loops[home_of(session.id, loops)].stamp_ms;
            for multi in &session.multis {
                let wait = multi::wait_after(multi.wait_left_ms, stamp);
                multi_waits.insert((session.id, multi.request_id), wait);
            }
        }
        snapshot::rebuild_shards(base, &log.loops, &mut tables);
        Ok(Replay {
            tables,
            sessions,
            multi_waits,
            positions: log.loops.clone(),
            index: log.index,
            sink: Vec::new(),
            batches: 0,
        })
    }

    /// An empty state, before the first base entry of a cluster's log.
    pub fn empty() -> Replay {
        Replay {
            tables: Vec::new(),
            sessions: BTreeMap::new(),
            multi_waits: BTreeMap::new(),
            positions: Vec::new(),
            index: 0,
            sink: Vec::new(),
            batches: 0,
        }
    }

    /// Applies committed entry `index` of a cluster's log: nothing for an
    /// empty one (a new leader's first), a base entry replaces the state,
    /// any other is batches (`apply_entry`).
    pub fn apply_committed(&mut self, index: u64, data: &[u8]) -> Result<(), ReplayError> {
        if data.is_empty() {
            return Ok(());
        }
        let Some(base) = data.strip_prefix(&BASE_MARK) else {
            return self.apply_entry(data);
        };
        let mut state = crate::dump::decode(base)
            .map_err(|e| ReplayError(format!("base entry {index}: {e}")))?;
        match &mut state.log {
            Some(log) => log.index = index,
            None => return Err(corrupt("a base entry without loop positions")),
        }
        *self = Replay::from_snapshot(&state)?;
        Ok(())
    }

    /// The log index the snapshot covers.
    pub fn snapshot_index(&self) -> u64 {
        self.index
    }

    /// Applies one log entry's data (any number of batches). Batches a
    /// loop's part of the snapshot already has are skipped.
    pub fn apply_entry(&mut self, data: &[u8]) -> Result<(), ReplayError> {
        let mut entry = Reader { rest: data };
        while !entry.rest.is_empty() {
            let idx = entry.u16()? as usize;
            let batch = entry.u64()?;
            let len = entry.u32()? as usize;
            let records = entry.take(len)?;
            let Some(position) = self.positions.get_mut(idx) else {
                return Err(corrupt("batch of a loop the snapshot does not have"));
            };
            if batch <= position.batch {
                continue;
            }
            if batch != position.batch + 1 {
                return Err(ReplayError(format!(
                    "loop {idx}'s batch {batch} follows batch {}: the log has a gap",
                    position.batch
                )));
            }
            position.batch = batch;
            self.batches += 1;
            self.apply_records(idx, records)?;
        }
        Ok(())
    }

    fn apply_records(&mut self, idx: usize, records: &[u8]) -> Result<(), ReplayError> {
        let loops = self.tables.len();
        let mut r = Reader { rest: records };
        while !r.rest.is_empty() {
            let tag = r.u8()?;
            match tag {
                TICK => {
                    let now = r.u64()?;
                    self.stamp(idx, now)?;
                    self.tables[idx].tick(now, &mut self.sink);
                }
                SESSION_OPEN => {
                    let id = r.u64()?;
                    let secret: [u8; SECRET_LEN] =
                        r.take(SECRET_LEN)?.try_into().expect("secret length");
                    let grace_ms = r.u32()?;
                    let client_name = r.bytes()?.to_vec();
                    let client_id = match r.u8()? {
                        0 => None,
                        1 => Some(r.bytes()?.to_vec()),
                        _ => return Err(corrupt("bad client id tag")),
                    };
                    let session = DumpSession {
                        id,
                        secret,
                        client_name,
                        client_id,
                        grace_ms,
                        order: None,
                        multis: Vec::new(),
                    };
                    self.sessions.insert(id, session);
                }
                SESSION_END => {
                    let id = r.u64()?;
                    self.sessions.remove(&id);
                    let ended: Vec<(u64, u32)> = self
                        .multi_waits
                        .range((id, 0)..=(id, u32::MAX))
                        .map(|(k, _)| *k)
                        .collect();
                    for key in ended {
                        self.multi_waits.remove(&key);
                    }
                }
                SESSION_MULTI => {
                    let now = r.u64()?;
                    self.stamp(idx, now)?;
                    let id = r.u64()?;
                    let request_id = r.u32()?;
                    let begun = match r.u8()? {
                        0 => None,
                        1 => {
                            let wait = r.wait()?;
                            let count = r.u16()?;
                            let names = r.bytes()?.to_vec();
                            Some((wait, count, names))
                        }
                        _ => return Err(corrupt("bad multi-lock record")),
                    };
                    self.session_multi(id, request_id, begun)?;
                }
                SESSION_ORDER => {
                    let id = r.u64()?;
                    let (order, rest) = Order::decode(r.rest).map_err(|()| corrupt("bad order"))?;
                    r.rest = rest;
                    let session = self
                        .sessions
                        .get_mut(&id)
                        .ok_or_else(|| corrupt("the order of an unknown session"))?;
                    session.order = order;
                }
                ACQUIRE..=SIGNAL | FORCE_RELEASE | SET_CAPACITY | FAIL_WAITER => {
                    let now = r.u64()?;
                    let session = r.u64()?;
                    self.stamp(idx, now)?;
                    let command = decode_command(tag, session, &mut r)?;
                    if let Some(name) = command.lock_name() {
                        if shard_for(name, loops) != idx {
                            return Err(corrupt("a lock logged by a loop that does not own it"));
                        }
                    }
                    self.tables[idx].apply(now, command, &mut self.sink);
                }
                _ => return Err(corrupt("unknown record type")),
            }
            self.sink.clear();
        }
        Ok(())
    }

    /// A loop's clock never goes back within its log.
    /// A multi-lock of session `id` began (its wait, name count and names)
    /// or ended.
    fn session_multi(
        &mut self,
        id: u64,
        request_id: u32,
        begun: Option<(Wait, u16, Vec<u8>)>,
    ) -> Result<(), ReplayError> {
        let session = self
            .sessions
            .get_mut(&id)
            .ok_or_else(|| corrupt("a multi-lock of an unknown session"))?;
        session.multis.retain(|m| m.request_id != request_id);
        self.multi_waits.remove(&(id, request_id));
        if let Some((wait, count, names)) = begun {
            let multi = DumpMulti {
                request_id,
                wait_left_ms: 0,
                count,
                names,
            };
            if multi.request().is_none() || session.multis.len() >= IN_FLIGHT_PER_SESSION_MAX {
                return Err(corrupt("a bad multi-lock"));
            }
            session.multis.push(multi);
            self.multi_waits.insert((id, request_id), wait);
        }
        Ok(())
    }

    fn stamp(&mut self, idx: usize, now: u64) -> Result<(), ReplayError> {
        let position = &mut self.positions[idx];
        if now < position.stamp_ms {
            return Err(corrupt("a loop's time went backwards"));
        }
        position.stamp_ms = now;
        Ok(())
    }

    /// The replayed state's `fingerprint`.
    pub fn fingerprint(&self) -> Vec<u8> {
        let batches: Vec<u64> = self.positions.iter().map(|p| p.batch).collect();
        fingerprint(&self.tables, self.sessions.values().cloned(), &batches)
    }

    /// The replayed state as a dump (each loop's leases and waits counted
    /// from its last stamp), with the log position it reached.
    pub fn finish(self, index: u64, term: u64) -> Dump {
        self.snapshot(index, term)
    }

    /// What `finish` gives, leaving the replay to go on (a follower's
    /// snapshot of its log).
    pub fn snapshot(&self, index: u64, term: u64) -> Dump {
        let mut parts = Vec::with_capacity(self.tables.len());
        let mut positions = self.positions.clone();
        for (table, position) in self.tables.iter().zip(positions.iter_mut()) {
            position.last_token = table.last_token();
            parts.push(snapshot::export_shard(table, position.stamp_ms));
        }
        let created = positions.iter().map(|p| p.stamp_ms).max().unwrap_or(0);
        let loops = positions.len();
        let mut sessions: Vec<DumpSession> = self.sessions.values().cloned().collect();
        for session in &mut sessions {
            let stamp = positions[home_of(session.id, loops)].stamp_ms;
            for multi in &mut session.multis {
                let wait = self.multi_waits[&(session.id, multi.request_id)];
                multi.wait_left_ms = multi::wait_left(wait, stamp);
            }
            // As a live export lists them (`snapshot::durable_sessions`).
            session.multis.sort_unstable_by_key(|m| m.request_id);
        }
        snapshot::exact_merge(
            parts,
            sessions,
            created,
            LogPosition {
                index,
                term,
                loops: positions,
            },
        )
    }
}

fn decode_command<'a>(
    tag: u8,
    session: u64,
    r: &mut Reader<'a>,
) -> Result<Command<'a>, ReplayError> {
    Ok(match tag {
        ACQUIRE => {
            let request_id = r.u32()?;
            let (mode, weight, capacity) = match r.u8()? {
                0 => (Mode::Exclusive, 1, 0),
                1 => (Mode::Shared, 1, 0),
                2 => (Mode::Permits, r.u32()?, r.u32()?),
                _ => return Err(corrupt("bad mode")),
            };
            if mode == Mode::Permits && !(1..=capacity).contains(&weight) {
                return Err(corrupt("bad weight"));
            }
            let wait = r.wait()?;
            let lease_ms = r.u32()?;
            let flags = r.u8()?;
            let name = r.name()?;
            Command::Acquire(Acquire {
                session,
                request_id,
                name,
                mode,
                weight,
                capacity,
                wait,
                lease_ms,
                reentrant: flags & 1 != 0,
                notify_queued: flags & 2 != 0,
            })
        }
        RELEASE | FORCE_RELEASE => {
            let request_id = r.u32()?;
            let token = r.u64()?;
            let name = r.name()?;
            match tag {
                RELEASE => Command::Release {
                    session,
                    request_id,
                    name,
                    token,
                },
                _ => Command::ForceRelease {
                    session,
                    request_id,
                    name,
                    token,
                },
            }
        }
        EXTEND => {
            let request_id = r.u32()?;
            let lease_ms = r.u32()?;
            let token = r.u64()?;
            let name = r.name()?;
            Command::Extend {
                session,
                request_id,
                name,
                lease_ms,
                token,
            }
        }
        SET_CAPACITY => {
            let request_id = r.u32()?;
            let capacity = r.u32()?;
            if capacity == 0 {
                return Err(corrupt("capacity 0"));
            }
            Command::SetCapacity {
                session,
                request_id,
                capacity,
                name: r.name()?,
            }
        }
        FAIL_WAITER => Command::FailWaiter {
            session,
            request_id: r.u32()?,
            cycle: r.bytes()?,
        },
        CANCEL => Command::Cancel {
            session,
            request_id: r.u32()?,
            target: r.u32()?,
        },
        END_SESSION => Command::EndSession { session },
        INTRODUCE => Command::Introduce {
            session,
            client_name: r.bytes()?,
        },
        SIGNAL => {
            let request_id = r.u32()?;
            let op = match r.u8()? {
                0 => SignalOp::Set { notify: false },
                1 => SignalOp::Set { notify: true },
                2 => SignalOp::Delete,
                _ => return Err(corrupt("bad signal op")),
            };
            let name = r.name()?;
            let signal = r.bytes()?;
            Command::Signal {
                session,
                request_id,
                name,
                signal,
                op,
            }
        }
        _ => unreachable!("caller matched the tag"),
    })
}

/// The dump with its records in one canonical order (sessions by id, holds
/// by name and token, each lock's waiters in queue order, signals sorted),
/// so two equal states encode to the same bytes.
pub fn canonical(mut state: Dump) -> Dump {
    state.sessions.sort_by_key(|s| s.id);
    state
        .holds
        .sort_by(|a, b| (&a.name, a.token).cmp(&(&b.name, b.token)));
    // Stable: the queue order of one lock's waiters stays.
    state.waiters.sort_by(|a, b| a.name.cmp(&b.name));
    state.signals.sort();
    state
}

/// `dump::encode` of the canonical form.
pub fn state_bytes(state: &Dump) -> Vec<u8> {
    dump::encode(&canonical(state.clone()))
}

/// The whole state of the machine as bytes, independent of when it is
/// looked at (deadlines absolute, not "left"): each loop's table and
/// batch count, and the sessions. Two runs that applied the same records
/// have the same fingerprint; the determinism tests compare them.
pub fn fingerprint(
    tables: &[LockTable],
    sessions: impl Iterator<Item = DumpSession>,
    batches: &[u64],
) -> Vec<u8> {
    // A multi-lock's wait is kept on the clock of whoever keeps it.
    let sessions = sessions.map(|mut s| {
        for multi in &mut s.multis {
            multi.wait_left_ms = 0;
        }
        s
    });
    let mut parts: Vec<(snapshot::LoopState, LoopPosition)> = tables
        .iter()
        .zip(batches)
        .map(|(table, &batch)| {
            let position = LoopPosition {
                stamp_ms: 0,
                batch,
                last_token: table.last_token(),
            };
            (snapshot::export_shard(table, 0), position)
        })
        .collect();
    if let Some((first, _)) = parts.first_mut() {
        first.sessions = sessions.collect();
    }
    state_bytes(&snapshot::log_snapshot(parts, 0, 0))
}
