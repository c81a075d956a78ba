//! ACQUIRE_ALL and ACQUIRE_POOL at the session's home: the request starts
//! a `state::multi::Multi`, and each step it names (acquire the next name,
//! give back what was taken) is sent to the shard of that name as an
//! ordinary command with the request's id; the shards' answers come back
//! through `Session::record`, which says the next step or the final reply.

use super::EventLoop;
use crate::connection::ConnRef;
use crate::lock_table::{Command, Mode, SessionId, Wait};
use crate::multi::{self, Failure, Multi, Request, Step};
use crate::protocol::{self, Status, WAIT_FOREVER};
use crate::session::{LockName, Pending, PendingOp};

impl EventLoop {
    /// Starts an admitted ACQUIRE_ALL or ACQUIRE_POOL of session `id`.
    pub(super) fn start_multi(
        &mut self,
        id: SessionId,
        request_id: u32,
        (asked, wait_ms, notify_queued): (Request<'_>, u32, bool),
        conn: ConnRef,
    ) {
        let wait = match wait_ms {
            0 => Wait::Try,
            WAIT_FOREVER => Wait::Forever,
            ms => Wait::Until(self.now_ms + u64::from(ms)),
        };
        let mut multi = Multi::new(asked, wait);
        let step = multi.start();
        self.metrics.inc_acquisitions();
        if self.shared.log.is_some() {
            self.journal
                .session_multi(self.now_ms, id, request_id, Some(&multi));
        }
        let session = self.sessions.get_mut(id).expect("checked by the caller");
        session.begin_multi(
            request_id,
            Pending {
                shard: 0,
                op: PendingOp::Native(multi.opcode()),
                name: LockName::new(),
                mode: Mode::Exclusive,
                notify_queued,
                queued: false,
                conn,
                started_us: self.now_us,
                multi: Some(Box::new(multi)),
            },
        );
        self.multi_step(id, request_id, step);
    }

    /// The ACQUIRE_ALL `request_id` of session `id` was answered.
    pub(super) fn end_multi(&mut self, id: SessionId, request_id: u32) {
        if self.shared.log.is_some() {
            self.journal
                .session_multi(self.now_ms, id, request_id, None);
        }
    }

    /// Sends the steps the delivered effects called for (each may call
    /// for more, through the effects it makes).
    pub(super) fn run_multi_steps(&mut self) {
        while let Some((id, request_id, step)) = self.multi_steps.pop_front() {
            self.multi_step(id, request_id, step);
        }
    }

    /// Sends the commands of `step` of the ACQUIRE_ALL `request_id`.
    pub(super) fn multi_step(&mut self, id: SessionId, request_id: u32, step: Step) {
        match step {
            Step::Acquire(take) => {
                let shard = self.shard_of(&take.name);
                if let Some(pending) = self
                    .sessions
                    .get_mut(id)
                    .and_then(|s| s.pending.get_mut(&request_id))
                {
                    // A CANCEL goes to the acquire in flight.
                    pending.shard = shard as u8;
                    pending.name = take.name.clone();
                }
                self.touch(id, shard);
                if !take.tags.is_empty() {
                    let (name, tags) = (&take.name[..], &take.tags[..]);
                    self.route_to_shard(shard, Command::Tag { name, tags });
                }
                let command = multi::acquire(id, request_id, &take);
                self.route_to_shard(shard, command);
            }
            Step::Release(holds) => {
                for (name, token) in holds {
                    let shard = self.shard_of(&name);
                    let command = Command::Release {
                        session: id,
                        request_id,
                        name: &name,
                        token,
                    };
                    self.route_to_shard(shard, command);
                }
            }
            Step::Abort => {
                // Cancelled, or a part was taken away.
                let shard = self
                    .sessions
                    .get(id)
                    .and_then(|s| s.pending.get(&request_id))
                    .map(|p| p.shard as usize);
                if let Some(shard) = shard {
                    let fail = Command::FailWaiter {
                        session: id,
                        request_id,
                        cycle: b"",
                    };
                    self.route_to_shard(shard, fail);
                }
            }
            Step::Wait => {}
            Step::Granted(_) | Step::Failed(_) => {
                unreachable!("a final step is answered by Session::record")
            }
        }
    }
}

/// Writes the final reply to an ACQUIRE_ALL or ACQUIRE_POOL (`op`).
pub(super) fn encode_final(
    out: &mut Vec<u8>,
    (op, request_id): (u8, u32),
    result: &Result<Vec<u8>, Failure>,
    deferred: bool,
) {
    match result {
        Ok(body) => protocol::encode_granted_body(out, op, request_id, body, deferred),
        Err(Failure::Outcome(outcome)) => {
            super::native::encode_outcome(out, op, request_id, *outcome, deferred)
        }
        Err(Failure::Deadlock(cycle)) => {
            protocol::encode_reply(out, op, deferred, Status::Deadlock, request_id, cycle)
        }
    }
}
