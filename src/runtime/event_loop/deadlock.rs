//! Deadlock detection rounds (`state::deadlock` decides; this carries the
//! messages). Loop 0 starts a round every `DEADLOCK_ROUND_MS` while any
//! shard has queued acquires: every loop reports its shard's wait edges
//! (`Msg::WaitEdges`, `Msg::WaitEdgesReply`); once all have, the detector
//! names one wait per confirmed cycle, and loop 0 sends each to its shard
//! (`Msg::FailWaiter`), which fails it — logged like any change — only if it
//! is still the same wait. Rounds follow each other (one in flight at a
//! time), so a round's reads all end before the next one's begin, which is
//! what the detector's two-sightings rule needs. A frozen (shutting down)
//! loop starts no round and fails no wait.

use super::{EventLoop, Msg};
use crate::deadlock::{Detector, ShardEdge};
use crate::limits::{DEADLOCK_ROUND_MS, WAIT_EDGES_PER_SHARD_MAX};
use crate::lock_table::{Command, RequestId, SessionId, WaitEdge};

/// Loop 0's detector and the round in flight.
#[derive(Default)]
pub(super) struct Rounds {
    detector: Detector,
    round: u64,
    /// Loops whose edges this round still waits for.
    awaiting: usize,
    edges: Vec<ShardEdge>,
    /// No shard cut its edges short this round.
    complete: bool,
    /// When the next round may start.
    next_ms: u64,
}

impl Rounds {
    /// When loop 0 must wake for the next round.
    pub(super) fn next_ms(&self) -> Option<u64> {
        (self.awaiting == 0).then_some(self.next_ms)
    }
}

impl EventLoop {
    /// Loop 0, every turn: starts a round when one is due and some shard
    /// has queued acquires (as of the loops' last turns).
    pub(super) fn start_deadlock_round(&mut self) {
        let loops = self.shared.peers.len();
        let now_ms = self.now_ms;
        let Some(rounds) = self.deadlock.as_mut() else {
            return;
        };
        if self.frozen || rounds.awaiting > 0 || now_ms < rounds.next_ms {
            return;
        }
        rounds.next_ms = now_ms + DEADLOCK_ROUND_MS;
        if self.shared.metrics.iter().all(|m| m.waiters() == 0) {
            rounds.detector.reset();
            return;
        }
        rounds.round += 1;
        rounds.awaiting = loops;
        rounds.edges.clear();
        rounds.complete = true;
        let round = rounds.round;
        for peer in (0..loops).filter(|&peer| peer != self.idx) {
            self.outgoing[peer].push_back(Msg::WaitEdges { round });
        }
        self.report_wait_edges(round);
    }

    /// Any loop: sends its shard's wait edges for `round` to loop 0.
    pub(super) fn report_wait_edges(&mut self, round: u64) {
        let mut edges = Vec::new();
        let complete = self.table.wait_edges(&mut edges, WAIT_EDGES_PER_SHARD_MAX);
        let shard = self.idx;
        if self.deadlock.is_some() {
            self.wait_edges_reply(round, shard, edges, complete);
        } else {
            self.outgoing[0].push_back(Msg::WaitEdgesReply {
                round,
                shard,
                edges,
                complete,
            });
        }
    }

    /// Loop 0: one shard's edges; the last one ends the round.
    pub(super) fn wait_edges_reply(
        &mut self,
        round: u64,
        shard: usize,
        edges: Vec<WaitEdge>,
        complete: bool,
    ) {
        let rounds = self.deadlock.as_mut().expect("edges go to loop 0");
        if round != rounds.round || rounds.awaiting == 0 {
            return;
        }
        rounds
            .edges
            .extend(edges.into_iter().map(|edge| (shard, edge)));
        rounds.complete &= complete;
        rounds.awaiting -= 1;
        if rounds.awaiting > 0 {
            return;
        }
        let edges = std::mem::take(&mut rounds.edges);
        let victims = if rounds.complete {
            rounds.detector.round(edges)
        } else {
            // Too many edges to see the whole graph: no verdict, and no
            // comparison with the next round either.
            rounds.detector.reset();
            Vec::new()
        };
        for victim in victims {
            let cycle: Box<[u8]> = victim.cycle.into();
            let (session, request_id, seq) = (victim.session, victim.request_id, victim.seq);
            if victim.shard == self.idx {
                self.fail_waiter(session, request_id, seq, &cycle);
            } else {
                self.outgoing[victim.shard].push_back(Msg::FailWaiter {
                    session,
                    request_id,
                    seq,
                    cycle,
                });
            }
        }
    }

    /// The shard of a wait: fails it with `Deadlock` if it is still the
    /// wait the detector saw.
    pub(super) fn fail_waiter(
        &mut self,
        session: SessionId,
        request_id: RequestId,
        seq: u64,
        cycle: &[u8],
    ) {
        if self.frozen || self.table.queued_seq(session, request_id) != Some(seq) {
            return;
        }
        self.apply_to_shard(Command::FailWaiter {
            session,
            request_id,
            cycle,
        });
    }
}
