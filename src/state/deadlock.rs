//! Deadlock detection over every shard: the wait-for graph of sessions,
//! its cycles, and which wait of each cycle to fail. Pure: the event loops
//! gather the shards' edges (`LockTable::wait_edges`) in rounds and apply
//! the verdicts (`Command::FailWaiter`).
//!
//! A node is a session; an edge says that a queued acquire of one session
//! waits for another session (a hold it conflicts with, or a conflicting
//! acquire queued ahead of it). A session with a queued acquire is taken to
//! be blocked (it releases nothing until it is granted): a cycle is then a
//! deadlock, which nothing but a failed wait (or a timeout) ends.
//!
//! The shards are read one after the other, not at one instant, so one
//! round may see edges that never existed together. An edge is therefore
//! believed only if two consecutive rounds saw it (the same wait, by its
//! `seq`, and the same hold or wait it waits for): such an edge existed all
//! the time in between (a wait's edge changes only when what it waits for
//! goes — nothing is ever queued ahead of it — and a `seq` or a token
//! never names anything else), so every edge of a cycle of believed edges
//! existed at the instant the earlier round ended: a deadlock then, and
//! still one, since a deadlock does not end by itself. Waits that are
//! merely long are never reported.
//!
//! Of each cycle the youngest wait (queued last, by the shards' clocks in
//! ms; waits queued in the same ms by session, then request id, the
//! greatest taken as the youngest) is failed, with `Deadlock` and a
//! description of the cycle; the others proceed.

use hashbrown::{HashMap, HashSet};

use crate::lock_table::{Blocker, RequestId, SessionId, WaitEdge};

/// The longest cycle description sent to a client.
pub const CYCLE_TEXT_MAX: usize = 1024;

/// An edge and the shard that reported it.
pub type ShardEdge = (usize, WaitEdge);

/// What names an edge from one round to the next.
type EdgeKey = (usize, u64, Blocker);

fn key((shard, edge): &ShardEdge) -> EdgeKey {
    (*shard, edge.seq, edge.by)
}

/// A wait to fail: the queued acquire `request_id` of `session` in
/// `shard`, still the wait numbered `seq` there, and the cycle it closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Victim {
    pub shard: usize,
    pub session: SessionId,
    pub request_id: RequestId,
    pub seq: u64,
    pub cycle: Vec<u8>,
}

/// The detector between rounds: the edges the last round saw.
#[derive(Debug, Default)]
pub struct Detector {
    seen: HashSet<EdgeKey>,
}

impl Detector {
    /// One round's edges, from every shard: the waits to fail, one per
    /// cycle among the edges this round and the last one both saw.
    pub fn round(&mut self, edges: Vec<ShardEdge>) -> Vec<Victim> {
        let believed: Vec<ShardEdge> = edges
            .iter()
            .filter(|edge| self.seen.contains(&key(edge)))
            .cloned()
            .collect();
        self.seen = edges.iter().map(key).collect();
        victims(&believed)
    }

    /// Forgets the last round (its edges cannot be compared with the next
    /// round's: a round was skipped or cut short).
    pub fn reset(&mut self) {
        self.seen.clear();
    }
}

/// One wait of every cycle of `edges`, until none is left.
fn victims(edges: &[ShardEdge]) -> Vec<Victim> {
    let mut out_edges: HashMap<SessionId, Vec<usize>> = HashMap::new();
    for (i, (_, edge)) in edges.iter().enumerate() {
        out_edges.entry(edge.waiter).or_default().push(i);
    }
    let mut roots: Vec<SessionId> = out_edges.keys().copied().collect();
    roots.sort_unstable();
    let mut search = Search {
        edges,
        out_edges,
        failed: HashSet::new(),
        done: HashSet::new(),
    };
    let mut victims = Vec::new();
    while let Some(cycle) = search.find_cycle(&roots) {
        let youngest = *cycle
            .iter()
            .max_by_key(|&&i| {
                let (_, e) = &edges[i];
                (e.since_ms, e.waiter, e.request_id)
            })
            .expect("a cycle has edges");
        let (shard, edge) = &edges[youngest];
        search.failed.insert((*shard, edge.waiter, edge.request_id));
        victims.push(Victim {
            shard: *shard,
            session: edge.waiter,
            request_id: edge.request_id,
            seq: edge.seq,
            cycle: describe(edges, &cycle, youngest),
        });
    }
    victims
}

/// A depth-first search for cycles, kept between the cycles it finds:
/// failing a wait only removes edges, so a session found on no cycle
/// (`done`) stays on none, and each is searched from once in all.
struct Search<'e> {
    edges: &'e [ShardEdge],
    out_edges: HashMap<SessionId, Vec<usize>>,
    /// The waits failed so far: their edges are gone.
    failed: HashSet<(usize, SessionId, RequestId)>,
    /// Sessions from which no cycle can be reached.
    done: HashSet<SessionId>,
}

impl Search<'_> {
    /// The edges of one cycle (in order) among the edges of waits not
    /// failed, searched from `roots` in turn.
    fn find_cycle(&mut self, roots: &[SessionId]) -> Option<Vec<usize>> {
        let edges = self.edges;
        for &root in roots {
            if self.done.contains(&root) {
                continue;
            }
            // The path: (session, next out-edge to try), and the edges taken.
            let mut path: Vec<(SessionId, usize)> = vec![(root, 0)];
            let mut on_path: HashSet<SessionId> = HashSet::from_iter([root]);
            let mut taken: Vec<usize> = Vec::new();
            while let Some(&mut (node, ref mut next)) = path.last_mut() {
                let outs = self.out_edges.get(&node).map_or(&[][..], Vec::as_slice);
                let live = |i: usize| {
                    let (shard, e) = &edges[i];
                    !self.failed.contains(&(*shard, e.waiter, e.request_id))
                };
                let Some(skip) = outs[*next..].iter().position(|&i| live(i)) else {
                    self.done.insert(node);
                    on_path.remove(&node);
                    path.pop();
                    taken.pop();
                    continue;
                };
                let i = outs[*next + skip];
                *next += skip + 1;
                let to = edges[i].1.blocker;
                if on_path.contains(&to) {
                    // Back to the path: the cycle is from `to` on.
                    let start = path
                        .iter()
                        .position(|&(n, _)| n == to)
                        .expect("on the path");
                    let mut cycle = taken[start..].to_vec();
                    cycle.push(i);
                    return Some(cycle);
                }
                if !self.done.contains(&to) {
                    on_path.insert(to);
                    path.push((to, 0));
                    taken.push(i);
                }
            }
        }
        None
    }
}

/// "session 0x.. waits for "x" held by session 0x..; ...", from the
/// victim's wait round the cycle, cut at `CYCLE_TEXT_MAX` bytes.
fn describe(edges: &[ShardEdge], cycle: &[usize], first: usize) -> Vec<u8> {
    let at = cycle
        .iter()
        .position(|&i| i == first)
        .expect("in the cycle");
    let mut text = String::from("deadlock: ");
    for (n, &i) in cycle[at..].iter().chain(&cycle[..at]).enumerate() {
        let e = &edges[i].1;
        let name = String::from_utf8_lossy(&e.name);
        let how = match e.by {
            Blocker::Hold(_) => "held by",
            Blocker::Waiter(_) => "queued first by",
        };
        if n > 0 {
            text.push_str("; ");
        }
        text.push_str(&format!(
            "session {:#x} waits for {name:?} {how} session {:#x}",
            e.waiter, e.blocker
        ));
    }
    if text.len() > CYCLE_TEXT_MAX {
        let mut end = CYCLE_TEXT_MAX - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(waiter: SessionId, seq: u64, blocker: SessionId, by: Blocker, name: &str) -> WaitEdge {
        WaitEdge {
            waiter,
            request_id: seq as RequestId,
            seq,
            since_ms: seq,
            blocker,
            by,
            name: name.as_bytes().into(),
        }
    }

    #[test]
    fn a_cycle_is_reported_once_two_rounds_saw_it() {
        let cycle = vec![
            (0, edge(1, 10, 2, Blocker::Hold(5), "y")),
            (1, edge(2, 11, 1, Blocker::Hold(6), "x")),
        ];
        let mut detector = Detector::default();
        assert!(detector.round(cycle.clone()).is_empty(), "one sighting");
        let victims = detector.round(cycle);
        assert_eq!(victims.len(), 1);
        let victim = &victims[0];
        // The youngest wait (queued last) is failed.
        assert_eq!((victim.shard, victim.session, victim.seq), (1, 2, 11));
        let text = String::from_utf8(victim.cycle.clone()).unwrap();
        assert_eq!(
            text,
            "deadlock: session 0x2 waits for \"x\" held by session 0x1; \
             session 0x1 waits for \"y\" held by session 0x2"
        );
    }

    #[test]
    fn edges_that_did_not_last_are_not_believed() {
        let mut detector = Detector::default();
        // Round 1 saw 1 -> 2; round 2 saw 2 -> 1 and a new 1 -> 2 (another
        // wait): never both at once as far as the rounds can tell.
        detector.round(vec![(0, edge(1, 10, 2, Blocker::Hold(5), "y"))]);
        let victims = detector.round(vec![
            (0, edge(1, 12, 2, Blocker::Hold(5), "y")),
            (1, edge(2, 11, 1, Blocker::Hold(6), "x")),
        ]);
        assert!(victims.is_empty());
        // A chain is no cycle, however long it lasts.
        let chain = vec![
            (0, edge(1, 1, 2, Blocker::Hold(1), "a")),
            (0, edge(2, 2, 3, Blocker::Waiter(1), "a")),
        ];
        detector.reset();
        detector.round(chain.clone());
        assert!(detector.round(chain).is_empty());
    }

    #[test]
    fn every_cycle_loses_one_wait_and_overlapping_ones_share_it() {
        // 1 -> 2 -> 3 -> 1 and 3 -> 4 -> 3; and a separate 5 <-> 6.
        let edges = vec![
            (0, edge(1, 1, 2, Blocker::Hold(1), "a")),
            (0, edge(2, 2, 3, Blocker::Hold(2), "b")),
            (1, edge(3, 9, 1, Blocker::Hold(3), "c")),
            (1, edge(3, 3, 4, Blocker::Hold(4), "d")),
            (2, edge(4, 4, 3, Blocker::Hold(5), "e")),
            (2, edge(5, 5, 6, Blocker::Hold(6), "f")),
            (3, edge(6, 6, 5, Blocker::Waiter(5), "g")),
        ];
        let mut detector = Detector::default();
        detector.round(edges.clone());
        let mut failed: Vec<(SessionId, u64)> = detector
            .round(edges)
            .iter()
            .map(|v| (v.session, v.seq))
            .collect();
        failed.sort_unstable();
        // Session 3's wait 9 ends the first cycle; 3 -> 4 -> 3 loses its
        // youngest wait, 4's; 5 <-> 6 loses 6's.
        assert_eq!(failed, [(3, 9), (4, 4), (6, 6)]);
    }

    /// Many cycles and a long chain into them: each cycle loses exactly
    /// one wait, the chain none (the search keeps what it learned between
    /// cycles, so this is one pass, not one per cycle).
    #[test]
    fn many_cycles_behind_a_long_chain_each_lose_one_wait() {
        let mut edges = Vec::new();
        let pairs = 500;
        for k in 0..pairs {
            let (a, b) = (10_000 + 2 * k, 10_001 + 2 * k);
            edges.push((0, edge(a, a, b, Blocker::Hold(a), "p")));
            edges.push((1, edge(b, b, a, Blocker::Hold(b), "q")));
        }
        // 0 -> 1 -> ... -> 999 -> the first pair.
        for i in 0..1000 {
            let to = if i == 999 { 10_000 } else { i + 1 };
            edges.push((2, edge(i, 100_000 + i, to, Blocker::Hold(i), "c")));
        }
        let mut detector = Detector::default();
        detector.round(edges.clone());
        let mut failed: Vec<SessionId> = detector.round(edges).iter().map(|v| v.session).collect();
        failed.sort_unstable();
        let want: Vec<SessionId> = (0..pairs).map(|k| 10_001 + 2 * k).collect();
        assert_eq!(
            failed, want,
            "the younger wait of each pair, nothing of the chain"
        );
    }

    #[test]
    fn long_cycles_are_described_within_the_bound() {
        let n = 200u64;
        let edges: Vec<ShardEdge> = (0..n)
            .map(|i| {
                (
                    0,
                    edge(
                        i,
                        i + 1,
                        (i + 1) % n,
                        Blocker::Hold(i + 1),
                        "a-long-lock-name",
                    ),
                )
            })
            .collect();
        let mut detector = Detector::default();
        detector.round(edges.clone());
        let victims = detector.round(edges);
        assert_eq!(victims.len(), 1);
        assert!(victims[0].cycle.len() <= CYCLE_TEXT_MAX);
        assert!(victims[0].cycle.ends_with(b"..."));
    }
}
