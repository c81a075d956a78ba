//! Usage reports (resource_locker's reporter): per lock name, the acquires
//! asked, granted, refused busy and timed out, and the distributions of
//! wait and hold times, kept by each shard for its names; and per tag: a
//! name taken as a pool's candidate keeps the tags its request gave it
//! (the latest), and a report for a tag filter adds up the names whose
//! tags match. Observations, not state: not logged, not in a dump, gone
//! with a restart.
//!
//! Memory is bounded: at most `cap` names per shard. Every count decays by
//! half every `DECAY_MS` (so the report is about the last minutes, not
//! the server's whole life), and when a new name finds the map full, the
//! eighth of the names with the least activity (acquires, decayed) goes,
//! so a busy name is never pushed out by a burst of one-off names for
//! long. Times are in ms (the shard's clock), in power-of-two buckets:
//! a percentile is reported as its bucket's upper bound, so it is within a
//! factor of two (and 0 means under 1 ms).

use hashbrown::HashMap;

/// Counts halve this often.
pub const DECAY_MS: u64 = 60_000;
/// Buckets of a time distribution: 0 ms, then [2^(i-1), 2^i) ms; the last
/// takes everything from 2^30 ms (12 days) on.
const BUCKETS: usize = 32;

/// A distribution of times in ms, in power-of-two buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Times {
    counts: [u32; BUCKETS],
}

impl Times {
    fn bucket(ms: u64) -> usize {
        (64 - ms.leading_zeros() as usize).min(BUCKETS - 1)
    }

    pub fn record(&mut self, ms: u64) {
        let count = &mut self.counts[Self::bucket(ms)];
        *count = count.saturating_add(1);
    }

    /// Halves the distribution as its count is halved (rounded down):
    /// each bucket halved, and the units the roundings lost given back to
    /// the buckets that had an odd count, the slowest first — so spread
    /// observations never vanish while the count says they are there.
    fn halve(&mut self) {
        let target = self.count() / 2;
        let odd: Vec<usize> = (0..BUCKETS)
            .rev()
            .filter(|&i| self.counts[i] % 2 == 1)
            .collect();
        for count in &mut self.counts {
            *count /= 2;
        }
        let deficit = target - self.count();
        for &i in odd.iter().take(deficit as usize) {
            self.counts[i] += 1;
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// Adds `other`'s observations.
    pub fn merge(&mut self, other: &Times) {
        for (count, &more) in self.counts.iter_mut().zip(&other.counts) {
            *count = count.saturating_add(more);
        }
    }

    /// The upper bound (ms) of the bucket holding the `q` quantile (0.0 to
    /// 1.0); 0 with no observation.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &count) in self.counts.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                return if i == 0 { 0 } else { (1u64 << i) - 1 };
            }
        }
        unreachable!("the ranks add up to the total")
    }
}

/// What one name saw (decayed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameUsage {
    pub acquires: u64,
    pub grants: u64,
    pub busy: u64,
    pub timeouts: u64,
    /// From queueing to the grant (0 for a grant at once).
    pub wait: Times,
    /// From the grant to the end of the hold.
    pub hold: Times,
    /// The tags a pool request gave the name last (`key=value,...`).
    pub tags: Box<[u8]>,
}

impl NameUsage {
    /// Nothing observed (what decay leaves of an idle name).
    fn is_idle(&self) -> bool {
        self.acquires == 0
            && self.grants == 0
            && self.busy == 0
            && self.timeouts == 0
            && self.wait.count() == 0
            && self.hold.count() == 0
    }

    /// Adds `other`'s counts and times (a tag's total).
    pub fn add(&mut self, other: &NameUsage) {
        self.acquires += other.acquires;
        self.grants += other.grants;
        self.busy += other.busy;
        self.timeouts += other.timeouts;
        self.wait.merge(&other.wait);
        self.hold.merge(&other.hold);
    }

    fn halve(&mut self) {
        self.acquires /= 2;
        self.grants /= 2;
        self.busy /= 2;
        self.timeouts /= 2;
        self.wait.halve();
        self.hold.halve();
    }
}

/// A name's usage with how many hold and wait for it now — or a group's
/// total (a tag's: counts added, distributions merged).
#[derive(Debug, Clone, Default)]
pub struct UsageTotal {
    pub usage: NameUsage,
    pub held: u64,
    pub waiting: u64,
}

impl UsageTotal {
    pub fn add(&mut self, other: &UsageTotal) {
        self.usage.add(&other.usage);
        self.held += other.held;
        self.waiting += other.waiting;
    }
}

/// One shard's usage by name.
#[derive(Debug)]
pub struct Usage {
    names: HashMap<Box<[u8]>, NameUsage>,
    cap: usize,
    next_decay_ms: Option<u64>,
    /// Counts the records: what a reader saw is stale once it moved.
    version: u64,
}

/// What is observed of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// An acquire was asked for.
    Acquire,
    /// Granted after waiting this long (ms).
    Grant(u64),
    Busy,
    TimedOut,
    /// A hold ended after this long (ms).
    Held(u64),
}

impl Usage {
    pub fn new(cap: usize) -> Usage {
        assert!(cap >= 8);
        Usage {
            names: HashMap::new(),
            cap,
            next_decay_ms: None,
            version: 0,
        }
    }

    /// The entry of `name`, made if need be (evicting if the map is full;
    /// the name is copied only then).
    fn entry(&mut self, now_ms: u64, name: &[u8]) -> &mut NameUsage {
        self.version += 1;
        self.decay(now_ms);
        if !self.names.contains_key(name) && self.names.len() >= self.cap {
            self.evict();
        }
        self.names.entry_ref(name).or_default()
    }

    /// `name` has these `tags` (a pool's candidate, before its acquire).
    pub fn tag(&mut self, now_ms: u64, name: &[u8], tags: &[u8]) {
        let usage = self.entry(now_ms, name);
        if *usage.tags != *tags {
            usage.tags = tags.into();
        }
    }

    /// Records `seen` of `name` at `now_ms`.
    pub fn record(&mut self, now_ms: u64, name: &[u8], seen: Seen) {
        let usage = self.entry(now_ms, name);
        match seen {
            Seen::Acquire => usage.acquires += 1,
            Seen::Grant(wait_ms) => {
                usage.grants += 1;
                usage.wait.record(wait_ms);
            }
            Seen::Busy => usage.busy += 1,
            Seen::TimedOut => usage.timeouts += 1,
            Seen::Held(hold_ms) => usage.hold.record(hold_ms),
        }
    }

    fn decay(&mut self, now_ms: u64) {
        let next = *self.next_decay_ms.get_or_insert(now_ms + DECAY_MS);
        if now_ms < next {
            return;
        }
        // Once per period passed (a long idle time decays it all).
        let periods = (now_ms - next) / DECAY_MS + 1;
        for _ in 0..periods.min(64) {
            self.names.values_mut().for_each(NameUsage::halve);
        }
        self.names.retain(|_, u| !u.is_idle());
        self.next_decay_ms = Some(next + periods * DECAY_MS);
    }

    /// Drops the eighth of the names with the fewest acquires.
    fn evict(&mut self) {
        let mut activity: Vec<u64> = self.names.values().map(|u| u.acquires).collect();
        let at = activity.len() / 8;
        let (_, &mut limit, _) = activity.select_nth_unstable(at);
        let mut dropped = 0;
        let goal = at.max(1);
        self.names.retain(|_, u| {
            let drop = dropped < goal && u.acquires <= limit;
            dropped += usize::from(drop);
            !drop
        });
    }

    /// The `top` names with the most acquires (then by name), with their
    /// usage as of `now_ms` (the halvings due since the last record done).
    pub fn top(&self, now_ms: u64, top: usize) -> Vec<(&[u8], NameUsage)> {
        self.top_tagged(now_ms, top, b"")
    }

    /// `top`, of the names whose tags match `filter` (`pool::tags_match`;
    /// empty: every name).
    pub fn top_tagged(&self, now_ms: u64, top: usize, filter: &[u8]) -> Vec<(&[u8], NameUsage)> {
        let mut all: Vec<(&[u8], &NameUsage)> = self
            .names
            .iter()
            .filter(|(_, u)| crate::pool::tags_match(&u.tags, filter))
            .map(|(n, u)| (&**n, u))
            .collect();
        all.sort_unstable_by(|a, b| b.1.acquires.cmp(&a.1.acquires).then(a.0.cmp(b.0)));
        all.truncate(top);
        let due = match self.next_decay_ms {
            Some(next) if now_ms >= next => ((now_ms - next) / DECAY_MS + 1).min(64),
            _ => 0,
        };
        all.into_iter()
            .map(|(name, usage)| {
                let mut usage = usage.clone();
                (0..due).for_each(|_| usage.halve());
                (name, usage)
            })
            .collect()
    }

    /// Moves with every record.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn get(&self, name: &[u8]) -> Option<&NameUsage> {
        self.names.get(name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Halving keeps the distribution's count equal to the halved count,
    /// even when the observations sit in different buckets.
    #[test]
    fn a_spread_distribution_survives_halving() {
        let mut times = Times::default();
        for ms in [5, 40, 900] {
            times.record(ms);
        }
        times.halve();
        assert_eq!(times.count(), 1, "3 halved is 1");
        assert_eq!(times.quantile(0.5), 1023, "the slowest odd bucket keeps it");
        times.halve();
        assert_eq!((times.count(), times.quantile(0.99)), (0, 0));
        let mut many = Times::default();
        for ms in [1, 1, 2, 3, 100, 100, 100] {
            many.record(ms);
        }
        many.halve();
        assert_eq!(many.count(), 3);
    }

    #[test]
    fn times_are_bucketed_by_powers_of_two() {
        let mut times = Times::default();
        assert_eq!(times.quantile(0.5), 0);
        for ms in [0, 1, 2, 3, 900, 1000] {
            times.record(ms);
        }
        assert_eq!(times.count(), 6);
        // 0 | 1 | 2,3 | 900,1000 in [512, 1024).
        assert_eq!(times.quantile(0.1), 0);
        assert_eq!(times.quantile(0.3), 1);
        assert_eq!(times.quantile(0.5), 3);
        assert_eq!(times.quantile(1.0), 1023);
        times.record(u64::MAX);
        assert_eq!(times.quantile(1.0), (1 << 31) - 1);
    }

    #[test]
    fn counts_decay_and_idle_names_go() {
        let mut usage = Usage::new(8);
        usage.record(0, b"a", Seen::Acquire);
        usage.record(0, b"a", Seen::Acquire);
        usage.record(0, b"a", Seen::Grant(5));
        usage.record(0, b"b", Seen::Acquire);
        usage.record(DECAY_MS, b"c", Seen::Busy);
        assert_eq!(usage.get(b"a").unwrap().acquires, 1);
        assert_eq!(usage.get(b"a").unwrap().grants, 0);
        assert!(usage.get(b"b").is_none(), "decayed to nothing");
        // A long idle time decays everything.
        usage.record(10 * DECAY_MS, b"d", Seen::Acquire);
        assert_eq!(usage.len(), 1);
    }

    /// Tags stay with a name's entry; a filter picks the names whose tags
    /// have its pairs; totals add counts and distributions.
    #[test]
    fn names_keep_their_tags_and_filters_pick_them() {
        let mut usage = Usage::new(8);
        usage.tag(0, b"gpu1", b"model=T1,site=a");
        usage.record(0, b"gpu1", Seen::Acquire);
        usage.record(0, b"gpu1", Seen::Grant(3));
        usage.tag(0, b"gpu2", b"model=T2");
        usage.record(0, b"gpu2", Seen::Acquire);
        usage.record(0, b"plain", Seen::Acquire);
        usage.record(0, b"plain", Seen::Acquire);
        let t1 = usage.top_tagged(0, 10, b"model=T1");
        assert_eq!(t1.len(), 1);
        assert_eq!((t1[0].0, t1[0].1.grants), (&b"gpu1"[..], 1));
        assert_eq!(usage.top_tagged(0, 10, b"site=b").len(), 0);
        assert_eq!(usage.top(0, 10)[0].0, b"plain", "every name, busiest first");
        let mut total = NameUsage::default();
        for (_, u) in usage.top_tagged(0, 10, b"") {
            total.add(&u);
        }
        assert_eq!(
            (total.acquires, total.grants, total.wait.count()),
            (4, 1, 1)
        );
        // Decay drops an idle name, tags and all.
        usage.record(2 * DECAY_MS, b"x", Seen::Acquire);
        assert!(usage.get(b"gpu1").is_none());
    }

    #[test]
    fn the_map_is_bounded_and_keeps_the_busiest() {
        let mut usage = Usage::new(64);
        for _ in 0..100 {
            usage.record(0, b"hot", Seen::Acquire);
        }
        for i in 0..10_000u32 {
            usage.record(0, &i.to_le_bytes(), Seen::Acquire);
            assert!(usage.len() <= 64);
        }
        assert_eq!(usage.get(b"hot").unwrap().acquires, 100);
        assert_eq!(usage.top(0, 1)[0].0, b"hot");
        // Read later, the halvings due since are applied.
        assert_eq!(usage.top(DECAY_MS, 1)[0].1.acquires, 50);
        assert_eq!(usage.top(3 * DECAY_MS, 1)[0].1.acquires, 12);
    }
}
