//! An atomic multi-lock in progress (ACQUIRE_ALL), as its session's home
//! keeps it: which name it takes next, the tokens so far, and what to do
//! when it fails. Pure; the event loop turns its steps into commands.
//!
//! The names are taken one at a time in ascending byte order, each as an
//! ordinary acquire (same request id, same FIFO queue as everyone else),
//! waiting until the request's one deadline. Every multi-lock takes its
//! names in that one order, so no two of them can wait for each other in
//! a cycle. The client hears only the end: all the tokens, once every name
//! is held; or a failure, once every name taken so far is released again —
//! so it never holds, nor is told of, a part of the set.

use crate::dump::WAIT_FOREVER;
use crate::lock_table::{Acquire, Command, Mode, Outcome, RequestId, SessionId, Wait};
use crate::order::Order;
use crate::protocol::AllNames;
use crate::session::LockName;

/// The command of a `Step::Acquire` of the multi-lock `request_id` of
/// `session`: an ordinary acquire, whose interim QUEUED tells the home.
pub fn acquire(
    session: SessionId,
    request_id: RequestId,
    (name, mode, wait): (&[u8], Mode, Wait),
) -> Command<'_> {
    Command::Acquire(Acquire {
        session,
        request_id,
        name,
        mode,
        weight: 1,
        capacity: 0,
        wait,
        lease_ms: 0,
        reentrant: false,
        notify_queued: true,
    })
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

/// What the home does next for a multi-lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Acquire this name (the request's id, its mode, the request's wait).
    Acquire(LockName, Mode, Wait),
    /// Release these holds (name, token); the failure is answered once the
    /// last release is confirmed.
    Release(Vec<(LockName, u64)>),
    /// Answer: every name is held; one token per name, request order.
    Granted(Vec<u64>),
    /// Answer the failure: nothing of the set is held.
    Failed(Failure),
    /// End the acquire in flight at once (a part was taken away: the
    /// request fails, and need not wait for its current name first).
    Abort,
    /// Nothing to do until the next outcome.
    Wait,
}

#[derive(Debug, Clone)]
pub struct Multi {
    /// The names and modes, in the request's order.
    entries: Vec<(LockName, Mode)>,
    /// Indices into `entries` by name: the order they are taken in.
    by_name: Vec<usize>,
    /// How many of `by_name` are held.
    held: usize,
    /// Tokens by entry (0: not held).
    tokens: Vec<u64>,
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
    /// A multi-lock of `names` with one `wait` for all of them.
    pub fn new(names: AllNames<'_>, wait: Wait) -> Multi {
        let entries: Vec<(LockName, Mode)> = names
            .iter()
            .map(|(mode, name)| (LockName::from_slice(name), mode))
            .collect();
        let mut by_name: Vec<usize> = (0..entries.len()).collect();
        by_name.sort_unstable_by(|&a, &b| entries[a].0.cmp(&entries[b].0));
        Multi {
            tokens: vec![0; entries.len()],
            entries,
            by_name,
            held: 0,
            wait,
            doomed: false,
            failed: None,
            releasing: 0,
        }
    }

    /// The first step.
    pub fn start(&self) -> Step {
        self.next_acquire()
    }

    /// The names and modes, in the request's order.
    pub fn entries(&self) -> &[(LockName, Mode)] {
        &self.entries
    }

    /// The names as `AllNames` encodes them: (count, bytes).
    pub fn encoded_names(&self) -> (u16, Vec<u8>) {
        let list: Vec<(Mode, &[u8])> = self.entries.iter().map(|(n, m)| (*m, &n[..])).collect();
        let mut bytes = Vec::new();
        AllNames::encode(&list, &mut bytes);
        let count = u16::try_from(list.len()).expect("at most MULTI_NAMES_MAX");
        (count, bytes)
    }

    /// The wait every step has.
    pub fn wait(&self) -> Wait {
        self.wait
    }

    /// The name being acquired now, unless it is releasing.
    pub fn current(&self) -> Option<&[u8]> {
        match self.failed {
            None => self.by_name.get(self.held).map(|&i| &*self.entries[i].0),
            Some(_) => None,
        }
    }

    fn next_acquire(&self) -> Step {
        let (name, mode) = &self.entries[self.by_name[self.held]];
        Step::Acquire(name.clone(), *mode, self.wait)
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
        match outcome {
            Outcome::Granted { token } => {
                self.tokens[self.by_name[self.held]] = token;
                self.held += 1;
                if self.doomed {
                    self.fail(Failure::Outcome(Outcome::Cancelled))
                } else if self.held == self.entries.len() {
                    Step::Granted(self.tokens.clone())
                } else {
                    self.next_acquire()
                }
            }
            // Once doomed, whatever ends the wait, the answer is Cancelled.
            _ if self.doomed => self.fail(Failure::Outcome(Outcome::Cancelled)),
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
        let Some(at) = self.entries.iter().position(|(n, _)| **n == *name) else {
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
            .entries
            .iter()
            .zip(&self.tokens)
            .filter(|(_, &token)| token != 0)
            .map(|((name, _), &token)| (name.clone(), token))
            .collect();
        self.releasing = releases.len();
        self.failed = Some(failure.clone());
        match releases.is_empty() {
            true => Step::Failed(failure),
            false => Step::Release(releases),
        }
    }
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
        Multi::new(AllNames::parse(list.len() as u16, &bytes).unwrap(), wait)
    }

    fn acquire(name: &str, mode: Mode, wait: Wait) -> Step {
        Step::Acquire(LockName::from_slice(name.as_bytes()), mode, wait)
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
            Step::Granted(vec![12, 10, 11])
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
