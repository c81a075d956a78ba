//! What the server's state looks like in a dump, both ways, as pure
//! functions (no I/O, no clock: time is passed in): a shard's and a home's
//! part of the dump (`export_shard`, `export_sessions`), the merge of every
//! loop's part (`merge`), and putting a dump back into fresh tables and
//! sessions (`restore`). With `--durability log` the same records make
//! the log's snapshots: every session's durable part (`durable_sessions`),
//! merged as is (`exact_merge`), and put back exactly where the log's
//! replay starts (`rebuild_shards`). The loops export at the shutdown barrier, the
//! server restores at start, and the seeded simulation drives both.

use crate::connection::ConnRef;
use crate::dump::{self, Dump, DumpHold, DumpMulti, DumpSession, DumpWaiter};
use crate::limits::{CLIENT_NAME_LEN_MAX, IN_FLIGHT_PER_SESSION_MAX};
use crate::lock_table::{shard_for, Acquire, Command, Effect, Hold, Kind, LockTable, Mode, Wait};
use crate::multi::{self, Multi, Step};
use crate::protocol::opcode;
use crate::session::{home_of, Held, LockName, Pending, PendingOp, Session, Sessions};

/// What a loop owned when it stopped: its shard's holds and signals, its
/// sessions, and its last fencing token (for the dump).
#[derive(Debug, Default)]
pub struct LoopState {
    pub last_token: u64,
    pub sessions: Vec<DumpSession>,
    pub holds: Vec<DumpHold>,
    pub waiters: Vec<DumpWaiter>,
    pub signals: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A shard's part of the dump: holds (with what is left of their leases),
/// queued acquires (in queue order), signals, the last token. Grant times
/// are in server-clock ms, which are Unix ms.
pub fn export_shard(table: &LockTable, now_ms: u64) -> LoopState {
    // What is left of a deadline, at least 1 ms (0 means "none").
    let left = |deadline: u64| deadline.saturating_sub(now_ms).max(1);
    let holds = table
        .holds()
        .map(|(name, kind, hold)| DumpHold {
            name: name.to_vec(),
            session: hold.session,
            mode: kind.mode,
            weight: hold.weight,
            capacity: kind.capacity,
            token: hold.token,
            since_unix_ms: hold.since_ms,
            lease_left_ms: match hold.lease_deadline_ms {
                0 => 0,
                deadline => left(deadline),
            },
        })
        .collect();
    let waiters = table
        .waiters()
        .map(|(name, kind, queued)| DumpWaiter {
            name: name.to_vec(),
            session: queued.session,
            request_id: queued.request_id,
            mode: queued.mode,
            weight: queued.weight,
            capacity: kind.capacity,
            lease_ms: queued.lease_ms,
            wait_left_ms: queued.deadline_ms.map_or(dump::WAIT_FOREVER, left),
            since_unix_ms: queued.since_ms,
        })
        .collect();
    let signals = table
        .signals()
        .map(|(name, signal)| (name.to_vec(), signal.to_vec()))
        .collect();
    LoopState {
        last_token: table.last_token(),
        sessions: Vec::new(),
        holds,
        waiters,
        signals,
    }
}

/// A home's part of the shutdown dump: its sessions with a grace period
/// (one without ends with its connection: not kept, and its holds are
/// dropped by `merge`).
pub fn export_sessions(sessions: &Sessions, now_ms: u64) -> Vec<DumpSession> {
    let mut all = durable_sessions(sessions, now_ms);
    all.retain(|s| s.grace_ms > 0);
    all
}

/// The durable part of every session of a home (what the log records of
/// a session): a snapshot of the log keeps them all.
pub fn durable_sessions(sessions: &Sessions, now_ms: u64) -> Vec<DumpSession> {
    sessions
        .iter()
        .map(|s| {
            let mut durable = durable_session(s);
            durable.multis = multis_of(s, now_ms);
            durable
        })
        .collect()
}

/// The session's ACQUIRE_ALLs in flight, with their waits left at `now_ms`.
fn multis_of(s: &Session, now_ms: u64) -> Vec<DumpMulti> {
    let mut multis: Vec<DumpMulti> = s
        .pending
        .iter()
        .filter_map(|(&request_id, p)| {
            let multi = p.multi.as_deref()?;
            let (count, names) = multi.encoded();
            Some(DumpMulti {
                request_id,
                wait_left_ms: multi::wait_left(multi.wait(), now_ms),
                count,
                names: names.to_vec(),
            })
        })
        .collect();
    multis.sort_unstable_by_key(|m| m.request_id);
    multis
}

/// The durable part of one session.
pub fn durable_session(s: &Session) -> DumpSession {
    DumpSession {
        id: s.id,
        secret: s.secret,
        client_name: s.client_name.to_vec(),
        client_id: s.client_id.as_ref().map(|id| id.to_vec()),
        grace_ms: s.grace_ms,
        order: s.order.clone(),
        multis: Vec::new(),
    }
}

/// A snapshot of the log from every loop's part (in loop order) and its
/// place in the log: the parts' sessions together, merged as is.
pub fn log_snapshot(parts: Vec<(LoopState, dump::LoopPosition)>, index: u64, term: u64) -> Dump {
    let mut states = Vec::with_capacity(parts.len());
    let mut positions = Vec::with_capacity(parts.len());
    let mut sessions = Vec::new();
    for (mut state, position) in parts {
        sessions.append(&mut state.sessions);
        states.push(state);
        positions.push(position);
    }
    let created = positions.iter().map(|p| p.stamp_ms).max().unwrap_or(0);
    let log = dump::LogPosition {
        index,
        term,
        loops: positions,
    };
    exact_merge(states, sessions, created, log)
}

/// The state a restart restores from a replayed snapshot: without its log
/// position, and without the holds and waits of sessions that had ended
/// (their release was still on its way to the shard).
pub fn settle(mut state: Dump) -> Dump {
    state.log = None;
    let kept: hashbrown::HashSet<u64> = state.sessions.iter().map(|s| s.id).collect();
    state.holds.retain(|h| kept.contains(&h.session));
    state.waiters.retain(|w| kept.contains(&w.session));
    state
}

/// Every loop's part of a snapshot of the log, as it is: nothing dropped
/// (a hold whose session just ended, and whose release is still on its
/// way to the shard, stays; a restart drops it with its session).
pub fn exact_merge(
    parts: Vec<LoopState>,
    sessions: Vec<DumpSession>,
    created_unix_ms: u64,
    log: dump::LogPosition,
) -> Dump {
    let mut state = Dump {
        created_unix_ms,
        sessions,
        log: Some(log),
        ..Dump::default()
    };
    for part in parts {
        state.last_token = state.last_token.max(part.last_token);
        state.holds.extend(part.holds);
        state.waiters.extend(part.waiters);
        state.signals.extend(part.signals);
    }
    state
}

/// Puts a snapshot of the log back into the tables of the server that
/// wrote it, each shard as it was at its loop's stamp: the same holds
/// (token, grant time, lease deadline), the same queues (same request
/// ids and deadlines), signals, and the shard's token counter. Records
/// this server could not have written (a name out of range) are skipped.
pub fn rebuild_shards(state: &Dump, positions: &[dump::LoopPosition], tables: &mut [LockTable]) {
    let loops = tables.len();
    let names: hashbrown::HashMap<u64, &[u8]> = state
        .sessions
        .iter()
        .map(|s| {
            (
                s.id,
                &s.client_name[..s.client_name.len().min(CLIENT_NAME_LEN_MAX)],
            )
        })
        .collect();
    let mut sink = Vec::new();
    let mut introduced = hashbrown::HashSet::new();
    let mut introduce =
        |table: &mut LockTable, session: u64, now_ms: u64, sink: &mut Vec<Effect>| {
            if let Some(client_name) = names.get(&session) {
                if introduced.insert((table.shard(), session)) {
                    let command = Command::Introduce {
                        session,
                        client_name,
                    };
                    table.apply(now_ms, command, sink);
                }
            }
        };
    for hold in state.holds.iter().filter(|h| valid_name(&h.name)) {
        let shard = shard_for(&hold.name, loops);
        let at = positions[shard].stamp_ms;
        let table = &mut tables[shard];
        table.restore_hold(
            &hold.name,
            kind_of(hold),
            Hold {
                session: hold.session,
                token: hold.token,
                weight: hold.weight,
                since_ms: hold.since_unix_ms,
                lease_deadline_ms: deadline_after(at, hold.lease_left_ms),
            },
        );
        introduce(table, hold.session, at, &mut sink);
    }
    for waiter in state.waiters.iter().filter(|w| valid_name(&w.name)) {
        let shard = shard_for(&waiter.name, loops);
        let at = positions[shard].stamp_ms;
        let table = &mut tables[shard];
        introduce(table, waiter.session, at, &mut sink);
        requeue(table, waiter, waiter.session, at, &mut sink);
        sink.clear();
    }
    for (name, signal) in state.signals.iter().filter(|(n, _)| valid_name(n)) {
        tables[shard_for(name, loops)].restore_signal(name, signal);
    }
    for (table, position) in tables.iter_mut().zip(positions) {
        table.raise_token_floor(position.last_token);
    }
}

/// Every loop's part in one dump taken at `created_unix_ms`: holds and
/// waits of sessions that are not kept end now, and whatever else a dump
/// cannot hold is dropped (`dump::sanitize`) rather than lose the whole
/// dump. Returns the dump and how many records were dropped that way.
pub fn merge(parts: Vec<LoopState>, created_unix_ms: u64) -> (Dump, usize) {
    let mut state = Dump {
        created_unix_ms,
        ..Dump::default()
    };
    for part in parts {
        state.last_token = state.last_token.max(part.last_token);
        state.sessions.extend(part.sessions);
        state.holds.extend(part.holds);
        state.waiters.extend(part.waiters);
        state.signals.extend(part.signals);
    }
    let kept: hashbrown::HashSet<u64> = state.sessions.iter().map(|s| s.id).collect();
    state.holds.retain(|h| kept.contains(&h.session));
    state.waiters.retain(|w| kept.contains(&w.session));
    let dropped = dump::sanitize(&mut state);
    (state, dropped)
}

/// Gives the dump's sessions back to their home loops, detached for
/// max(their grace, release-all timeout + 1 s), their holds (with what was
/// left of their leases) to the shards, and their queued acquires back in
/// the queues in their order (with what was left of their waits), pending
/// in their sessions. Grants this produces are in `effects`, per home.
pub fn restore(
    state: &Dump,
    now_ms: u64,
    restart_grace_ms: u64,
    tables: &mut [LockTable],
    sessions: &mut [Sessions],
    effects: &mut [Vec<Effect>],
) -> RestoreReport {
    let loops = tables.len();
    // Dumped session id → (restored id, home loop).
    let mut restored_ids: hashbrown::HashMap<u64, (u64, usize)> = hashbrown::HashMap::new();
    let put_back =
        |sessions: &mut [Sessions], home: usize, id: u64, s: &crate::dump::DumpSession| {
            let until_ms = now_ms + restart_grace_ms.max(u64::from(s.grace_ms));
            // A dump allows longer client names than HELLO does; listings
            // are sized for HELLO's.
            let name_len = s.client_name.len().min(CLIENT_NAME_LEN_MAX);
            let restored = sessions[home].restore(
                id,
                s.secret,
                s.grace_ms,
                &s.client_name[..name_len],
                s.client_id.as_deref(),
                until_ms,
            );
            restored.order = s.order.clone();
        };
    // First the sessions that keep their id: native ones (their home is in
    // the id, which the client will RESUME with) and LiveLock ones whose
    // client id still hashes to the same loop.
    for session in &state.sessions {
        let home = match &session.client_id {
            Some(client_id) => shard_for(client_id, loops),
            None => home_of(session.id, loops),
        };
        // One session per LiveLock client id (a dump may repeat one).
        let id_free = |sessions: &[Sessions]| {
            session
                .client_id
                .as_ref()
                .map_or(true, |c| sessions[home].by_client(c).is_none())
        };
        if home_of(session.id, loops) == home
            && sessions[home].get(session.id).is_none()
            && id_free(sessions)
        {
            put_back(sessions, home, session.id, session);
            restored_ids.insert(session.id, (session.id, home));
        }
    }
    // Then LiveLock sessions whose client id now hashes elsewhere (the
    // loop count changed): clients find them by client id, so a fresh
    // session id at the new home is as good.
    for session in &state.sessions {
        let Some(client_id) = &session.client_id else {
            continue;
        };
        let home = shard_for(client_id, loops);
        if restored_ids.contains_key(&session.id) || sessions[home].by_client(client_id).is_some() {
            continue;
        }
        let id = sessions[home].fresh_id();
        put_back(sessions, home, id, session);
        restored_ids.insert(session.id, (id, home));
    }
    // ACQUIRE_ALLs in flight start over: what they had taken, or were
    // waiting for, is given back (their clients were never told of it).
    let multis: hashbrown::HashMap<u64, &[DumpMulti]> = state
        .sessions
        .iter()
        .filter(|s| !s.multis.is_empty())
        .map(|s| (s.id, &s.multis[..]))
        .collect();
    // Their names and request ids, looked up once per hold and waiter.
    let mut parts: hashbrown::HashSet<(u64, Vec<u8>)> = hashbrown::HashSet::new();
    let mut requests: hashbrown::HashSet<(u64, u32)> = hashbrown::HashSet::new();
    for (&session, list) in &multis {
        for m in list.iter() {
            requests.insert((session, m.request_id));
            // Everything it may have taken (a pool: its queues too).
            if let Some(request) = m.request() {
                let multi = Multi::new(request, Wait::Try);
                parts.extend(multi.names().map(|n| (session, n.to_vec())));
            }
        }
    }
    let multi_part = |session: u64, name: &[u8], request_id: Option<u32>| {
        request_id.is_some_and(|r| requests.contains(&(session, r)))
            || parts.contains(&(session, name.to_vec()))
    };
    let mut restored = 0;
    let mut given_back = (0, 0);
    let mut sink = Vec::new();
    for hold in &state.holds {
        let Some(&(id, home)) = restored_ids.get(&hold.session) else {
            continue;
        };
        if multi_part(hold.session, &hold.name, None) {
            given_back.0 += 1;
            continue;
        }
        if !valid_name(&hold.name) {
            continue;
        }
        let mode = hold.mode;
        let shard = shard_for(&hold.name, loops);
        // A grant time in the future (a hostile or damaged dump) would
        // break the oldest-hold gauge (u64::MAX is its "no hold" value).
        let since_ms = hold.since_unix_ms.min(now_ms);
        let restored_hold = Hold {
            session: id,
            token: hold.token,
            weight: hold.weight,
            since_ms,
            lease_deadline_ms: deadline_after(now_ms, hold.lease_left_ms),
        };
        if !tables[shard].restore_hold(&hold.name, kind_of(hold), restored_hold) {
            continue;
        }
        restored += 1;
        let session = sessions[home].get_mut(id).expect("restored above");
        let held = Held {
            mode,
            token: hold.token,
            gen: session.attach_gen,
        };
        session.hold_granted(LockName::from_slice(&hold.name), held);
        introduce(session, shard, &mut tables[shard], now_ms, &mut sink);
    }
    let mut requeued = 0;
    for waiter in &state.waiters {
        let Some(&(id, home)) = restored_ids.get(&waiter.session) else {
            continue;
        };
        if !valid_name(&waiter.name) {
            continue;
        }
        if multi_part(waiter.session, &waiter.name, Some(waiter.request_id)) {
            given_back.1 += 1;
            continue;
        }
        let session = sessions[home].get_mut(id).expect("restored above");
        if session.pending.len() >= IN_FLIGHT_PER_SESSION_MAX
            || session.pending.contains_key(&waiter.request_id)
        {
            continue;
        }
        let shard = shard_for(&waiter.name, loops);
        let mode = waiter.mode;
        introduce(session, shard, &mut tables[shard], now_ms, &mut sink);
        session.pending.insert(
            waiter.request_id,
            Pending {
                shard: shard as u8,
                op: PendingOp::Native(match mode {
                    Mode::Permits => opcode::ACQUIRE_PERMITS,
                    Mode::Exclusive | Mode::Shared => opcode::ACQUIRE,
                }),
                name: LockName::from_slice(&waiter.name),
                mode,
                notify_queued: false,
                queued: false,
                conn: ConnRef::NONE,
                started_us: 0,
                multi: None,
            },
        );
        requeue(&mut tables[shard], waiter, id, now_ms, &mut sink);
        // Each effect goes to its session's home, which delivers it first;
        // a grant completes a wait, so it is pushed (deferred).
        for mut effect in sink.drain(..) {
            if let Effect::Reply { deferred, .. } = &mut effect {
                *deferred = true;
            }
            effects[home_of(effect.session(), loops)].push(effect);
        }
        requeued += 1;
    }
    let mut restarted = 0;
    for (dumped, list) in &multis {
        let Some(&(id, home)) = restored_ids.get(dumped) else {
            continue;
        };
        for dumped_multi in list.iter() {
            let Some(request) = dumped_multi.request() else {
                continue;
            };
            let session = sessions[home].get_mut(id).expect("restored above");
            if session.pending.len() >= IN_FLIGHT_PER_SESSION_MAX
                || session.pending.contains_key(&dumped_multi.request_id)
            {
                continue;
            }
            let wait = multi::wait_after(dumped_multi.wait_left_ms, now_ms);
            let mut multi = Multi::new(request, wait);
            let Step::Acquire(take) = multi.start() else {
                unreachable!("a multi-lock starts with an acquire")
            };
            let shard = shard_for(&take.name, loops);
            introduce(session, shard, &mut tables[shard], now_ms, &mut sink);
            session.begin_multi(
                dumped_multi.request_id,
                Pending {
                    shard: shard as u8,
                    op: PendingOp::Native(multi.opcode()),
                    name: take.name.clone(),
                    mode: take.mode,
                    notify_queued: false,
                    queued: false,
                    conn: ConnRef::NONE,
                    started_us: 0,
                    multi: Some(Box::new(multi)),
                },
            );
            let acquire = multi::acquire(id, dumped_multi.request_id, &take);
            tables[shard].apply(now_ms, acquire, &mut sink);
            // Its next steps are the home's, as the effects come in.
            for mut effect in sink.drain(..) {
                if let Effect::Reply { deferred, .. } = &mut effect {
                    *deferred = true;
                }
                effects[home_of(effect.session(), loops)].push(effect);
            }
            restarted += 1;
        }
    }
    for (name, signal) in &state.signals {
        if !name.is_empty() && name.len() <= crate::limits::NAME_LEN_MAX {
            tables[shard_for(name, loops)].restore_signal(name, signal);
        }
    }
    RestoreReport {
        sessions: restored_ids.len(),
        holds: restored,
        waiters: requeued,
        multis: restarted,
        given_back,
    }
}

/// What `restore` put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    pub sessions: usize,
    pub holds: usize,
    pub waiters: usize,
    /// ACQUIRE_ALLs restarted from their first name.
    pub multis: usize,
    /// Holds and queued acquires of those, given back.
    pub given_back: (usize, usize),
}

impl RestoreReport {
    /// Says on stderr what came back, and what of `state` could not.
    pub fn log(&self, state: &Dump, restart_grace_ms: u64) {
        let dropped_sessions = state.sessions.len() - self.sessions;
        let dropped_holds = state.holds.len() - self.holds - self.given_back.0;
        let dropped_waits = state.waiters.len() - self.waiters - self.given_back.1;
        if dropped_sessions + dropped_holds + dropped_waits > 0 {
            tracing::warn!(
                "{dropped_sessions} session(s), {dropped_holds} hold(s) and \
                 {dropped_waits} queued acquire(s) of the dump could not be restored (a \
                 lock name too long, a LiveLock client id given twice, a hold that conflicts)"
            );
        }
        tracing::info!(
            "restored {} session(s), {} hold(s) and {} queued acquire(s) from the \
             dump; they are released unless their clients reconnect within their grace (at \
             least {restart_grace_ms} ms)",
            self.sessions,
            self.holds,
            self.waiters,
        );
        if self.multis > 0 {
            tracing::info!(
                "{} multi-lock(s) in flight start over from their first name ({} hold(s) \
                 and queued acquire(s) of theirs given back)",
                self.multis,
                self.given_back.0 + self.given_back.1
            );
        }
    }
}

/// Tells `shard` the session's client name before its first hold or wait
/// there, and records that the session touched it.
fn introduce(
    session: &mut Session,
    shard: usize,
    table: &mut LockTable,
    now_ms: u64,
    sink: &mut Vec<Effect>,
) {
    if session.touched & (1 << shard) == 0 {
        session.touched |= 1 << shard;
        let introduce = Command::Introduce {
            session: session.id,
            client_name: &session.client_name,
        };
        table.apply(now_ms, introduce, sink);
    }
}

/// A name this server could hold (a dump may carry others).
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= crate::limits::NAME_LEN_MAX
}

fn kind_of(hold: &DumpHold) -> Kind {
    Kind {
        mode: hold.mode,
        capacity: hold.capacity,
    }
}

/// The deadline `left` ms after `at`; 0 (none) stays 0.
fn deadline_after(at: u64, left: u64) -> u64 {
    match left {
        0 => 0,
        left => at.saturating_add(left),
    }
}

/// Puts a dumped queued acquire back in its queue at `at` for `session`
/// (with QUEUED notice: whoever keeps its pending request learns it
/// waits), queued since when the dump says (not later than `at`).
fn requeue(
    table: &mut LockTable,
    waiter: &DumpWaiter,
    session: u64,
    at: u64,
    sink: &mut Vec<Effect>,
) {
    let acquire = Acquire {
        session,
        request_id: waiter.request_id,
        name: &waiter.name,
        mode: waiter.mode,
        weight: waiter.weight,
        capacity: waiter.capacity,
        wait: match waiter.wait_left_ms {
            dump::WAIT_FOREVER => Wait::Forever,
            left => Wait::Until(at.saturating_add(left)),
        },
        lease_ms: waiter.lease_ms,
        reentrant: false,
        notify_queued: true,
    };
    table.apply(at, Command::Acquire(acquire), sink);
    table.restore_waiter_since(session, waiter.request_id, waiter.since_unix_ms.min(at));
}
