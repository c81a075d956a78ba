//! Raft's view of a cluster node's log (raft-rs `Storage`): the latest
//! snapshot — index, term, members and the dump it is, which is what a
//! lagging member is sent — and the entries after it, in memory (raft-engine
//! keeps them on disk; the node writes both).

use std::sync::{Arc, RwLock, RwLockWriteGuard};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

#[derive(Default)]
pub struct Core {
    hard_state: HardState,
    conf_state: ConfState,
    /// The snapshot the entries follow (index 0: none yet).
    snapshot: Snapshot,
    /// Entries from snapshot index + 1 on.
    entries: Vec<Entry>,
}

impl Core {
    fn first_index(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last_index(&self) -> u64 {
        self.snapshot.get_metadata().index + self.entries.len() as u64
    }

    /// Appends `entries`, replacing any stored from their first index on.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        assert!(
            first.index >= self.first_index() && first.index <= self.last_index() + 1,
            "raft appends within the log"
        );
        let keep = (first.index - self.first_index()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    /// A snapshot received from the leader: it replaces the whole log.
    pub fn install(&mut self, snapshot: Snapshot) {
        let meta = snapshot.get_metadata();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.conf_state = meta.get_conf_state().clone();
        self.entries.clear();
        self.snapshot = snapshot;
    }

    /// A snapshot this node wrote (covering entries up to its index, which
    /// are applied): the entries it covers go.
    pub fn compact(&mut self, mut snapshot: Snapshot) {
        let index = snapshot.get_metadata().index;
        if index <= self.snapshot.get_metadata().index || index > self.last_index() {
            return;
        }
        snapshot
            .mut_metadata()
            .set_conf_state(self.conf_state.clone());
        let drop = (index + 1 - self.first_index()) as usize;
        self.entries.drain(..drop);
        self.snapshot = snapshot;
    }

    /// A membership change applied.
    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }
}

/// The storage raft reads, shared with the node that writes it.
#[derive(Clone, Default)]
pub struct ClusterStorage {
    core: Arc<RwLock<Core>>,
}

impl ClusterStorage {
    /// The log as found at start: `snapshot` (index 0 if none), the stored
    /// entries after it, the hard state, the members.
    pub fn new(
        snapshot: Snapshot,
        entries: Vec<Entry>,
        mut hard_state: HardState,
        conf_state: ConfState,
    ) -> ClusterStorage {
        let index = snapshot.get_metadata().index;
        hard_state.commit = hard_state.commit.max(index);
        hard_state.term = hard_state.term.max(snapshot.get_metadata().term);
        let entries = entries.into_iter().filter(|e| e.index > index).collect();
        ClusterStorage {
            core: Arc::new(RwLock::new(Core {
                hard_state,
                conf_state,
                snapshot,
                entries,
            })),
        }
    }

    pub fn wl(&self) -> RwLockWriteGuard<'_, Core> {
        self.core.write().expect("storage lock")
    }

    fn rl(&self) -> std::sync::RwLockReadGuard<'_, Core> {
        self.core.read().expect("storage lock")
    }
}

impl Storage for ClusterStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.rl();
        Ok(RaftState::new(
            core.hard_state.clone(),
            core.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.rl();
        if low < core.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(high <= core.last_index() + 1, "raft asks within the log");
        let offset = core.first_index();
        let mut entries = core.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let core = self.rl();
        let snapshot = core.snapshot.get_metadata();
        if idx == snapshot.index {
            return Ok(snapshot.term);
        }
        if idx < snapshot.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > core.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(core.entries[(idx - core.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let core = self.rl();
        let meta = core.snapshot.get_metadata();
        // A member added after the snapshot would refuse it (it is not
        // among its members): it waits for the next one, which the leader
        // takes when a change is applied.
        let knows = meta.get_conf_state().voters.contains(&to)
            || meta.get_conf_state().learners.contains(&to);
        if meta.index < request_index || core.snapshot.data.is_empty() || !knows {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(core.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Entry::default()
        }
    }

    fn snapshot(index: u64, term: u64) -> Snapshot {
        let mut snapshot = Snapshot {
            data: b"state".to_vec().into(),
            ..Snapshot::default()
        };
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = term;
        snapshot
            .mut_metadata()
            .set_conf_state(ConfState::from((vec![2], vec![])));
        snapshot
    }

    #[test]
    fn appends_replace_a_conflicting_tail_and_compaction_keeps_terms() {
        let storage = ClusterStorage::default();
        storage
            .wl()
            .set_conf_state(ConfState::from((vec![2], vec![])));
        storage
            .wl()
            .append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        storage.wl().append(&[entry(3, 2), entry(4, 2)]);
        assert_eq!(storage.last_index().unwrap(), 4);
        assert_eq!(storage.term(3).unwrap(), 2);
        // Compacting at 3: entries up to 3 go, the term of 3 stays known.
        storage.wl().compact(snapshot(3, 2));
        assert_eq!(storage.first_index().unwrap(), 4);
        assert_eq!(storage.term(3).unwrap(), 2);
        assert!(storage.term(2).is_err());
        let ctx = GetEntriesContext::empty(false);
        assert!(storage.entries(3, 5, None, ctx).is_err());
        let ctx = GetEntriesContext::empty(false);
        assert_eq!(storage.entries(4, 5, None, ctx).unwrap(), vec![entry(4, 2)]);
        assert_eq!(storage.snapshot(3, 2).unwrap().get_metadata().index, 3);
        assert!(storage.snapshot(4, 2).is_err(), "no snapshot that new yet");
        assert!(
            storage.snapshot(3, 5).is_err(),
            "node 5 is not among its members"
        );
    }

    #[test]
    fn an_installed_snapshot_replaces_the_log() {
        let storage = ClusterStorage::default();
        storage.wl().append(&[entry(1, 1), entry(2, 1)]);
        storage.wl().install(snapshot(10, 3));
        assert_eq!(storage.first_index().unwrap(), 11);
        assert_eq!(storage.last_index().unwrap(), 10);
        assert_eq!(storage.initial_state().unwrap().hard_state.commit, 10);
        storage.wl().append(&[entry(11, 3)]);
        assert_eq!(storage.term(11).unwrap(), 3);
    }
}
