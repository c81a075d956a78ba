//! An atomic multi-lock (ACQUIRE_ALL) or resource pool request
//! (ACQUIRE_POOL) in progress, as its session's home keeps it: what it
//! takes next, the tokens so far, and what to do when it fails. Pure; the
//! event loop turns its steps into commands.
//!
//! ACQUIRE_ALL takes its names one at a time in ascending byte order, each
//! as an ordinary acquire (same request id, same FIFO queue as everyone
//! else), waiting until the request's one deadline. Every multi-lock takes
//! its names in that one order, so no two of them can wait for each other
//! in a cycle. The client hears only the end: all the tokens, once every
//! name is held; or a failure, once every name taken so far is released
//! again — so it never holds, nor is told of, a part of the set.
//!
//! ACQUIRE_POOL ("K of these N") keeps the same rules with two phases.
//! Each requirement whose filter leaves more candidates than it needs has
//! a pool queue: a counting semaphore named after those candidates
//! ([`queue_name`]), capacity = their number, of which the request takes
//! K permits — FIFO among every request for that pool, and while pool
//! users hold the queue's permits, fewer candidates are taken than there
//! are free. Then the candidates, all requirements together, in byte
//! order: one a requirement still needs is tried (taken if free, passed
//! over if not) while enough of its candidates remain after it, and waited
//! for once they do not. Every wait is for a name above everything the
//! request holds (queues first, then candidates, each in byte order), so
//! pool requests and multi-locks never wait for each other in a cycle.

use crate::dump::WAIT_FOREVER;
use crate::lock_table::{Acquire, Command, Mode, Outcome, RequestId, SessionId, Wait};
use crate::order::Order;
use crate::pool::{self, PoolSpec, RequirementGrant};
use crate::protocol::AllNames;
use crate::session::LockName;

/// What a multi-step request asks for, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    All(AllNames<'a>),
    Pool(PoolSpec<'a>),
}

/// The top bit of an encoded request's count marks a pool request.
const POOL_FLAG: u16 = 0x8000;

impl<'a> Request<'a> {
    /// The request as a journal and a dump keep it: (count, bytes).
    pub fn decode(count: u16, bytes: &'a [u8]) -> Option<Request<'a>> {
        match count & POOL_FLAG {
            0 => AllNames::parse(count, bytes).map(Request::All),
            _ => PoolSpec::parse(count & !POOL_FLAG, bytes)
                .filter(|spec| spec.short_requirement().is_none())
                .map(Request::Pool),
        }
    }

    /// The pool queues it takes permits of (none for an ACQUIRE_ALL).
    pub fn queues(&self) -> Vec<LockName> {
        match self {
            Request::All(_) => Vec::new(),
            Request::Pool(spec) => pool_entries(*spec)
                .0
                .into_iter()
                .filter(|e| matches!(e.role, Role::Queue(_)))
                .map(|e| e.name)
                .collect(),
        }
    }

    /// Every name it may take (a pool: its candidates), as sent.
    pub fn names(&self) -> impl Iterator<Item = &'a [u8]> {
        let (all, pool) = match *self {
            Request::All(names) => (Some(names.iter().map(|(_, n)| n)), None),
            Request::Pool(spec) => (None, Some(spec.names())),
        };
        all.into_iter().flatten().chain(pool.into_iter().flatten())
    }
}

/// The command of a `Step::Acquire` of the multi-step request
/// `request_id` of `session`: an ordinary acquire, whose interim QUEUED
/// tells the home.
pub fn acquire(session: SessionId, request_id: RequestId, take: &Take) -> Command<'_> {
    Command::Acquire(Acquire {
        session,
        request_id,
        name: &take.name,
        mode: take.mode,
        weight: take.weight,
        capacity: take.capacity,
        wait: take.wait,
        lease_ms: 0,
        reentrant: false,
        notify_queued: true,
    })
}

/// The pool queue of the candidates `names` (any order): a semaphore
/// name that depends on the set only (FNV-1a of the sorted names).
pub fn queue_name(names: &[&[u8]]) -> LockName {
    let mut sorted = names.to_vec();
    sorted.sort_unstable();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for name in sorted {
        let len = u16::try_from(name.len()).unwrap_or(u16::MAX).to_le_bytes();
        for &b in len.iter().chain(name) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    LockName::from_slice(format!("pool:{hash:016x}").as_bytes())
}

/// What is left at `now_ms` of a multi-lock's `wait`, as a dump keeps it:
/// [`WAIT_FOREVER`], 0 for a try (or a wait that is over), else ms.
pub fn wait_left(wait: Wait, now_ms: u64) -> u64 {
    match wait {
        Wait::Try => 0,
        Wait::Until(at) => at.saturating_sub(now_ms).clamp(1, WAIT_FOREVER - 1),
        Wait::Forever => WAIT_FOREVER,
    }
}

/// The wait of a multi-lock restarted at `now_ms` with `left` (`wait_left`).
pub fn wait_after(left: u64, now_ms: u64) -> Wait {
    match left {
        0 => Wait::Try,
        WAIT_FOREVER => Wait::Forever,
        left => Wait::Until(now_ms.saturating_add(left)),
    }
}

/// Why a multi-lock failed: the outcome of the acquire that failed, or a
/// deadlock (the cycle's description).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Outcome(Outcome),
    Deadlock(Vec<u8>),
}

/// One acquire of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    pub name: LockName,
    pub mode: Mode,
    /// Permits (a pool queue); 1 for a lock.
    pub weight: u32,
    /// The queue's capacity; 0 for a lock.
    pub capacity: u32,
    pub wait: Wait,
    /// A pool candidate's tags (for usage reports, `Command::Tag`); empty
    /// for none.
    pub tags: Box<[u8]>,
}

/// What the home does next for a multi-step request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Acquire this (the request's id).
    Acquire(Take),
    /// Release these holds (name, token); the failure is answered once the
    /// last release is confirmed.
    Release(Vec<(LockName, u64)>),
    /// Answer: every name is held; the granted reply's body (ACQUIRE_ALL:
    /// one token per name, request order; ACQUIRE_POOL: `pool`'s grant).
    Granted(Vec<u8>),
    /// Answer the failure: nothing of the set is held.
    Failed(Failure),
    /// End the acquire in flight at once (a part was taken away: the
    /// request fails, and need not wait for its current name first).
    Abort,
    /// Nothing to do until the next outcome.
    Wait,
}

/// What an entry is to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// An ACQUIRE_ALL name: always taken.
    Name,
    /// Requirement `r`'s pool queue: K permits.
    Queue(usize),
    /// Requirement `r`'s candidate `index` (as sent).
    Candidate(usize, u16),
}

#[derive(Debug, Clone)]
struct Entry {
    name: LockName,
    mode: Mode,
    weight: u32,
    capacity: u32,
    role: Role,
    tags: Box<[u8]>,
}

#[derive(Debug, Clone)]
pub struct Multi {
    /// What was asked, encoded as the journal keeps it: (count, bytes).
    encoded: (u16, Vec<u8>),
    /// Everything it may take (ACQUIRE_ALL: the names in the request's
    /// order).
    entries: Vec<Entry>,
    /// Indices into `entries`: the order they are taken in.
    order: Vec<usize>,
    /// How far along `order` it is (the entry in flight).
    at: usize,
    /// Tokens by entry (0: not held).
    tokens: Vec<u64>,
    /// Per requirement (a pool): K, candidates taken, candidates not yet
    /// passed.
    need: Vec<usize>,
    got: Vec<usize>,
    left: Vec<usize>,
    /// The acquire in flight is a try (passed over if refused).
    trying: bool,
    wait: Wait,
    /// It is to fail Cancelled at its next outcome (`Step::Abort` ends the
    /// acquire in flight): a CANCEL of it, or a name it had taken was
    /// taken away (an operator's FORCE_RELEASE).
    doomed: bool,
    /// Set once it failed: what to answer once `releasing` is 0.
    failed: Option<Failure>,
    releasing: usize,
}

impl Multi {
    /// A request for `asked` with one `wait` for all of it. A pool request
    /// must have no short requirement (`PoolSpec::short_requirement`).
    pub fn new(asked: Request<'_>, wait: Wait) -> Multi {
        let (encoded, entries, need) = match asked {
            Request::All(names) => {
                let entries = names
                    .iter()
                    .map(|(mode, name)| Entry {
                        name: LockName::from_slice(name),
                        mode,
                        weight: 1,
                        capacity: 0,
                        role: Role::Name,
                        tags: Box::default(),
                    })
                    .collect();
                ((names.count(), names.bytes().to_vec()), entries, Vec::new())
            }
            Request::Pool(spec) => {
                let (entries, need) = pool_entries(spec);
                let encoded = (spec.count() | POOL_FLAG, spec.bytes().to_vec());
                (encoded, entries, need)
            }
        };
        let mut order: Vec<usize> = (0..entries.len()).collect();
        // Queues first, then the rest; each in byte order.
        order.sort_unstable_by_key(|&i| {
            let e = &entries[i];
            (!matches!(e.role, Role::Queue(_)), &e.name)
        });
        let mut left = vec![0; need.len()];
        for e in &entries {
            if let Role::Candidate(r, _) = e.role {
                left[r] += 1;
            }
        }
        Multi {
            encoded,
            tokens: vec![0; entries.len()],
            got: vec![0; need.len()],
            need,
            left,
            entries,
            order,
            at: 0,
            trying: false,
            wait,
            doomed: false,
            failed: None,
            releasing: 0,
        }
    }

    /// The first step.
    pub fn start(&mut self) -> Step {
        self.next()
    }

    /// Every name it may take.
    pub fn names(&self) -> impl Iterator<Item = &LockName> {
        self.entries.iter().map(|e| &e.name)
    }

    /// The holds it has (name, mode, token): once granted, the client's.
    pub fn taken(&self) -> impl Iterator<Item = (&LockName, Mode, u64)> {
        self.entries
            .iter()
            .zip(&self.tokens)
            .filter(|(_, &t)| t != 0)
            .map(|(e, &t)| (&e.name, e.mode, t))
    }

    /// What was asked, as `Request::decode` reads it: (count, bytes).
    pub fn encoded(&self) -> (u16, &[u8]) {
        (self.encoded.0, &self.encoded.1)
    }

    /// The opcode it was asked with.
    pub fn opcode(&self) -> u8 {
        match self.need.is_empty() {
            true => crate::protocol::opcode::ACQUIRE_ALL,
            false => crate::protocol::opcode::ACQUIRE_POOL,
        }
    }

    /// The wait every step has.
    pub fn wait(&self) -> Wait {
        self.wait
    }

    /// The name being acquired now, unless it is releasing.
    pub fn current(&self) -> Option<&[u8]> {
        match self.failed {
            None => self.order.get(self.at).map(|&i| &*self.entries[i].name),
            Some(_) => None,
        }
    }

    /// The next acquire from `at` on (passing over candidates whose
    /// requirement has enough), or the grant.
    fn next(&mut self) -> Step {
        while let Some(&i) = self.order.get(self.at) {
            let e = &self.entries[i];
            self.trying = false;
            if let Role::Candidate(r, _) = e.role {
                let still = self.need[r] - self.got[r];
                if still == 0 {
                    self.left[r] -= 1;
                    self.at += 1;
                    continue;
                }
                // Enough after this one: try it; else wait for it.
                self.trying = self.left[r] > still;
            }
            return Step::Acquire(Take {
                name: e.name.clone(),
                mode: e.mode,
                weight: e.weight,
                capacity: e.capacity,
                wait: if self.trying { Wait::Try } else { self.wait },
                tags: e.tags.clone(),
            });
        }
        Step::Granted(self.grant_body())
    }

    fn grant_body(&self) -> Vec<u8> {
        let mut body = Vec::new();
        if self.need.is_empty() {
            for token in &self.tokens {
                body.extend_from_slice(&token.to_le_bytes());
            }
            return body;
        }
        for r in 0..self.need.len() {
            let mut grant = RequirementGrant {
                permits: None,
                taken: Vec::new(),
            };
            for (e, &token) in self.entries.iter().zip(&self.tokens) {
                match e.role {
                    Role::Queue(q) if q == r => grant.permits = Some((e.name.to_vec(), token)),
                    Role::Candidate(c, index) if c == r && token != 0 => {
                        grant.taken.push((index, token))
                    }
                    _ => {}
                }
            }
            pool::encode_grant(&grant, &mut body);
        }
        body
    }

    /// The final outcome of the step in flight (an acquire, or one of the
    /// releases after a failure): what to do next.
    pub fn on_outcome(&mut self, outcome: Outcome) -> Step {
        if let Some(failure) = &self.failed {
            self.releasing -= 1;
            return match self.releasing {
                0 => Step::Failed(failure.clone()),
                _ => Step::Wait,
            };
        }
        let i = self.order[self.at];
        match outcome {
            Outcome::Granted { token } => {
                self.tokens[i] = token;
                if let Role::Candidate(r, _) = self.entries[i].role {
                    self.got[r] += 1;
                    self.left[r] -= 1;
                }
                self.at += 1;
                match self.doomed {
                    true => self.fail(Failure::Outcome(Outcome::Cancelled)),
                    false => self.next(),
                }
            }
            // Once doomed, whatever ends the wait, the answer is Cancelled.
            _ if self.doomed => self.fail(Failure::Outcome(Outcome::Cancelled)),
            // A candidate tried and found taken: passed over.
            Outcome::Busy | Outcome::AlreadyHeld if self.trying => {
                if let Role::Candidate(r, _) = self.entries[i].role {
                    self.left[r] -= 1;
                }
                self.at += 1;
                self.next()
            }
            other => self.fail(Failure::Outcome(other)),
        }
    }

    /// The acquire in flight was failed: to break a deadlock, or (after a
    /// part was lost: `Step::Abort`) to end the request.
    pub fn on_deadlock(&mut self, cycle: Vec<u8>) -> Step {
        match (&self.failed, self.doomed) {
            // Not a release's answer: nothing waits while it gives back.
            (Some(_), _) => Step::Wait,
            (None, true) => self.fail(Failure::Outcome(Outcome::Cancelled)),
            (None, false) => self.fail(Failure::Deadlock(cycle)),
        }
    }

    /// A hold was taken away: if it is one of this multi-lock's, it fails
    /// (`Step::Abort` ends the acquire in flight; its outcome fails it) and
    /// that hold is not released again.
    pub fn on_lost(&mut self, name: &[u8], token: u64) -> bool {
        let Some(at) = self.entries.iter().position(|e| *e.name == *name) else {
            return false;
        };
        if self.tokens[at] != token || token == 0 {
            return false;
        }
        self.tokens[at] = 0;
        self.doomed = true;
        true
    }

    /// A CANCEL of it: it fails Cancelled (`Step::Abort` ends the acquire
    /// in flight; its outcome fails it) — unless it is already failing
    /// (false: nothing to do).
    pub fn cancel(&mut self) -> bool {
        self.doomed = true;
        self.failed.is_none()
    }

    /// The first of `names` (byte order) whose place in `order` is not its
    /// place in byte order: an ordered session's multi-lock would take it
    /// against its order (it is refused, naming it).
    pub fn out_of_order<'n>(names: AllNames<'n>, order: &Order) -> Option<&'n [u8]> {
        let mut sorted: Vec<&[u8]> = names.iter().map(|(_, n)| n).collect();
        sorted.sort_unstable();
        sorted
            .windows(2)
            .find(|w| order.rank(w[0]) > order.rank(w[1]))
            .map(|w| w[1])
    }

    fn fail(&mut self, failure: Failure) -> Step {
        let releases: Vec<(LockName, u64)> = self
            .taken()
            .map(|(name, _, token)| (name.clone(), token))
            .collect();
        self.releasing = releases.len();
        self.failed = Some(failure.clone());
        match releases.is_empty() {
            true => Step::Failed(failure),
            false => Step::Release(releases),
        }
    }
}

/// The entries of a pool request and each requirement's K: per
/// requirement its queue (if its filter leaves more candidates than it
/// needs), then its matching candidates.
fn pool_entries(spec: PoolSpec<'_>) -> (Vec<Entry>, Vec<usize>) {
    let mut entries = Vec::new();
    let mut need = Vec::new();
    for (r, requirement) in spec.requirements().enumerate() {
        let matching: Vec<usize> = requirement.matching().collect();
        let k = usize::from(requirement.need);
        if matching.len() > k {
            let names: Vec<&[u8]> = matching
                .iter()
                .map(|&i| requirement.candidates[i].0)
                .collect();
            entries.push(Entry {
                name: queue_name(&names),
                mode: Mode::Permits,
                weight: u32::from(requirement.need),
                capacity: u32::try_from(matching.len()).expect("at most POOL_CANDIDATES_MAX"),
                role: Role::Queue(r),
                tags: Box::default(),
            });
        }
        for i in matching {
            entries.push(Entry {
                name: LockName::from_slice(requirement.candidates[i].0),
                mode: Mode::Exclusive,
                weight: 1,
                capacity: 0,
                role: Role::Candidate(r, u16::try_from(i).expect("at most POOL_CANDIDATES_MAX")),
                tags: requirement.candidates[i].1.into(),
            });
        }
        need.push(k);
    }
    (entries, need)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[(Mode, &str)]) -> Vec<u8> {
        let list: Vec<(Mode, &[u8])> = list.iter().map(|(m, n)| (*m, n.as_bytes())).collect();
        let mut out = Vec::new();
        AllNames::encode(&list, &mut out);
        out
    }

    fn multi(list: &[(Mode, &str)], wait: Wait) -> Multi {
        let bytes = names(list);
        Multi::new(
            Request::All(AllNames::parse(list.len() as u16, &bytes).unwrap()),
            wait,
        )
    }

    fn take(name: &str, mode: Mode, wait: Wait) -> Take {
        let (weight, capacity) = (1, 0);
        let name = LockName::from_slice(name.as_bytes());
        Take {
            name,
            mode,
            weight,
            capacity,
            wait,
            tags: Box::default(),
        }
    }

    fn acquire(name: &str, mode: Mode, wait: Wait) -> Step {
        Step::Acquire(take(name, mode, wait))
    }

    fn tokens(list: &[u64]) -> Step {
        Step::Granted(list.iter().flat_map(|t| t.to_le_bytes()).collect())
    }

    /// A pool request of `reqs`.
    fn pool_request(reqs: &[pool::RequirementText<'_>], wait: Wait) -> Multi {
        let bytes = pool::spec_bytes(reqs);
        let spec = PoolSpec::parse(reqs.len() as u16, &bytes).unwrap();
        let multi = Multi::new(Request::Pool(spec), wait);
        let (count, encoded) = multi.encoded();
        assert!(matches!(
            Request::decode(count, encoded),
            Some(Request::Pool(_))
        ));
        multi
    }

    fn permits(queue: &LockName, need: u32, capacity: u32, wait: Wait) -> Step {
        Step::Acquire(Take {
            name: queue.clone(),
            weight: need,
            capacity,
            ..take("", Mode::Permits, wait)
        })
    }

    fn queue(names: &[&str]) -> LockName {
        let names: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
        queue_name(&names)
    }

    /// The pool's queue first; then the candidates in byte order, tried
    /// while enough remain after them (a busy one is passed over), waited
    /// for once not; the grant names them per requirement.
    #[test]
    fn a_pool_takes_its_queue_then_free_candidates_in_byte_order() {
        let x = Mode::Exclusive;
        let w = Wait::Forever;
        let mut m = pool_request(&[(2, "", &[("d", ""), ("b", ""), ("c", ""), ("a", "")])], w);
        let q = queue(&["a", "b", "c", "d"]);
        assert_eq!(q, queue(&["d", "c", "b", "a"]), "the set names the queue");
        // The protocol's hash (PROTOCOL.md), pinned: clients compute it too.
        assert_eq!(&*queue(&["b", "a"]), b"pool:934aa6c4c6427684");
        assert_eq!(m.start(), permits(&q, 2, 4, w));
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 1 }),
            acquire("a", x, Wait::Try)
        );
        assert_eq!(m.on_outcome(Outcome::Busy), acquire("b", x, Wait::Try));
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 2 }),
            acquire("c", x, Wait::Try)
        );
        assert_eq!(
            m.on_outcome(Outcome::AlreadyHeld),
            acquire("d", x, w),
            "the last chance waits"
        );
        let Step::Granted(body) = m.on_outcome(Outcome::Granted { token: 3 }) else {
            panic!("granted")
        };
        let grant = pool::parse_grant(&body, &[2]).unwrap();
        assert_eq!(grant[0].permits, Some((q.to_vec(), 1)));
        // Candidates as sent: d is 0, b is 1.
        assert_eq!(grant[0].taken, vec![(0, 3), (1, 2)]);
        let held: Vec<_> = m
            .taken()
            .map(|(n, mode, t)| (n.to_vec(), mode, t))
            .collect();
        assert_eq!(held.len(), 3);
        assert!(held.contains(&(q.to_vec(), Mode::Permits, 1)));
    }

    /// A requirement that needs every candidate its filter leaves has no
    /// queue and waits for each; several requirements share one byte
    /// order; a candidate its requirement no longer needs is passed over.
    #[test]
    fn requirements_share_the_byte_order_and_filters_choose_candidates() {
        let x = Mode::Exclusive;
        let w = Wait::Until(50);
        let mut m = pool_request(
            &[
                (1, "m=1", &[("c", "m=1"), ("a", "m=2"), ("b", "m=1,s=2")]),
                (1, "", &[("z", "")]),
            ],
            w,
        );
        let q = queue(&["b", "c"]);
        assert_eq!(m.start(), permits(&q, 1, 2, w));
        let b = Take {
            tags: b"m=1,s=2"[..].into(),
            ..take("b", x, Wait::Try)
        };
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 5 }),
            Step::Acquire(b),
            "with its tags, for usage reports"
        );
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 6 }),
            acquire("z", x, w),
            "c passed over"
        );
        let Step::Granted(body) = m.on_outcome(Outcome::Granted { token: 7 }) else {
            panic!("granted")
        };
        let grant = pool::parse_grant(&body, &[1, 1]).unwrap();
        assert_eq!(grant[0].taken, vec![(2, 6)]);
        assert_eq!(grant[1].permits, None);
        assert_eq!(grant[1].taken, vec![(0, 7)]);
    }

    /// A pool that fails gives back its permits and candidates; a try's
    /// refusal of a candidate it must wait for fails it.
    #[test]
    fn a_failing_pool_gives_back_its_permits_too() {
        let x = Mode::Exclusive;
        let mut m = pool_request(&[(1, "", &[("a", ""), ("b", "")])], Wait::Try);
        let q = queue(&["a", "b"]);
        assert_eq!(m.start(), permits(&q, 1, 2, Wait::Try));
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 1 }),
            acquire("a", x, Wait::Try)
        );
        assert_eq!(m.on_outcome(Outcome::Busy), acquire("b", x, Wait::Try));
        assert_eq!(
            m.on_outcome(Outcome::Busy),
            Step::Release(vec![(q.clone(), 1)]),
            "b was its last chance"
        );
        assert_eq!(
            m.on_outcome(Outcome::Ok),
            Step::Failed(Failure::Outcome(Outcome::Busy))
        );
        assert_eq!(m.opcode(), crate::protocol::opcode::ACQUIRE_POOL);
    }

    /// Names go in byte order whatever the request's order; the tokens
    /// come back in the request's order.
    #[test]
    fn names_are_taken_in_byte_order_and_tokens_answer_in_request_order() {
        let (x, s) = (Mode::Exclusive, Mode::Shared);
        let mut m = multi(&[(x, "c"), (s, "a"), (x, "b")], Wait::Forever);
        assert_eq!(m.start(), acquire("a", s, Wait::Forever));
        assert_eq!(m.current(), Some(&b"a"[..]));
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 10 }),
            acquire("b", x, Wait::Forever)
        );
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 11 }),
            acquire("c", x, Wait::Forever)
        );
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 12 }),
            tokens(&[12, 10, 11])
        );
    }

    /// A failure releases what was taken, then answers; with nothing
    /// taken it answers at once.
    #[test]
    fn a_failure_gives_back_what_was_taken_first() {
        let x = Mode::Exclusive;
        let mut m = multi(&[(x, "a"), (x, "b"), (x, "c")], Wait::Try);
        m.start();
        m.on_outcome(Outcome::Granted { token: 1 });
        m.on_outcome(Outcome::Granted { token: 2 });
        let name = |n: &str| LockName::from_slice(n.as_bytes());
        assert_eq!(
            m.on_outcome(Outcome::Busy),
            Step::Release(vec![(name("a"), 1), (name("b"), 2)])
        );
        assert_eq!(m.current(), None);
        assert_eq!(m.on_outcome(Outcome::Ok), Step::Wait);
        assert_eq!(
            m.on_outcome(Outcome::Ok),
            Step::Failed(Failure::Outcome(Outcome::Busy))
        );

        let mut m = multi(&[(x, "a"), (x, "b")], Wait::Until(5));
        m.start();
        assert_eq!(
            m.on_outcome(Outcome::TimedOut),
            Step::Failed(Failure::Outcome(Outcome::TimedOut))
        );
        let mut m = multi(&[(x, "a"), (x, "b")], Wait::Forever);
        m.start();
        m.on_outcome(Outcome::Granted { token: 4 });
        assert_eq!(
            m.on_deadlock(b"cycle".to_vec()),
            Step::Release(vec![(name("a"), 4)])
        );
        assert_eq!(
            m.on_outcome(Outcome::Ok),
            Step::Failed(Failure::Deadlock(b"cycle".to_vec()))
        );
    }

    /// A CANCEL fails it at its next outcome, wherever it is: a grant on
    /// its way when the CANCEL came is given back with the rest.
    #[test]
    fn a_cancel_fails_it_at_its_next_outcome() {
        let x = Mode::Exclusive;
        let name = |n: &str| LockName::from_slice(n.as_bytes());
        let mut m = multi(&[(x, "a"), (x, "b")], Wait::Forever);
        m.start();
        assert!(m.cancel());
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 3 }),
            Step::Release(vec![(name("a"), 3)])
        );
        assert!(!m.cancel(), "already giving back");
        assert_eq!(
            m.on_outcome(Outcome::Ok),
            Step::Failed(Failure::Outcome(Outcome::Cancelled))
        );
    }

    /// An ordered session's multi-lock takes names in byte order: refused
    /// if its order ranks them otherwise.
    #[test]
    fn an_order_other_than_byte_order_is_named() {
        let bytes = names(&[
            (Mode::Exclusive, "a"),
            (Mode::Exclusive, "z"),
            (Mode::Shared, "m"),
        ]);
        let all = AllNames::parse(3, &bytes).unwrap();
        assert_eq!(Multi::out_of_order(all, &Order::Ascending), None);
        let z_first = Order::priorities([("z", 1)]).unwrap();
        assert_eq!(Multi::out_of_order(all, &z_first), Some(&b"z"[..]));
        let a_first = Order::priorities([("a", 1), ("m", 2)]).unwrap();
        assert_eq!(Multi::out_of_order(all, &a_first), None);
    }

    /// A name taken away while the rest are awaited fails the request at
    /// its next outcome, and is not released again.
    #[test]
    fn a_lost_part_fails_the_request() {
        let x = Mode::Exclusive;
        let mut m = multi(&[(x, "a"), (x, "b"), (x, "c")], Wait::Forever);
        m.start();
        m.on_outcome(Outcome::Granted { token: 1 });
        m.on_outcome(Outcome::Granted { token: 2 });
        assert!(!m.on_lost(b"a", 9), "another hold's token");
        assert!(!m.on_lost(b"z", 1), "not one of its names");
        assert!(m.on_lost(b"a", 1));
        let name = |n: &str| LockName::from_slice(n.as_bytes());
        assert_eq!(
            m.on_outcome(Outcome::Granted { token: 3 }),
            Step::Release(vec![(name("b"), 2), (name("c"), 3)])
        );
        m.on_outcome(Outcome::Ok);
        assert_eq!(
            m.on_outcome(Outcome::Ok),
            Step::Failed(Failure::Outcome(Outcome::Cancelled))
        );
        // The wait in flight ended for it (Step::Abort's FailWaiter): it
        // fails Cancelled, not Deadlock; a late failure while it gives
        // back is not a release's answer.
        let mut m = multi(&[(x, "a"), (x, "b")], Wait::Forever);
        m.start();
        m.on_outcome(Outcome::Granted { token: 1 });
        assert!(m.on_lost(b"a", 1));
        assert_eq!(
            m.on_deadlock(Vec::new()),
            Step::Failed(Failure::Outcome(Outcome::Cancelled))
        );
        let mut m = multi(&[(x, "a"), (x, "b")], Wait::Forever);
        m.start();
        m.on_outcome(Outcome::Granted { token: 1 });
        assert_eq!(
            m.on_outcome(Outcome::TimedOut),
            Step::Release(vec![(name("a"), 1)])
        );
        assert_eq!(m.on_deadlock(Vec::new()), Step::Wait);
        assert_eq!(
            m.on_outcome(Outcome::Ok),
            Step::Failed(Failure::Outcome(Outcome::TimedOut))
        );
    }
}
