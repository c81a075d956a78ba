//! The generator's own view of who holds each key, to catch a server that
//! grants a lock twice.
//!
//! One atomic word per key, shared by every thread:
//! - `0`: none of our connections believes it holds the key;
//! - `EXCLUSIVE | conn`: connection `conn` holds it exclusively;
//! - `n` in `1..EXCLUSIVE`: `n` of our connections hold it shared, or (a
//!   semaphore) `n` permits of it are held by our connections.
//!
//! A belief starts when a grant is *received* and ends when the release is
//! *queued for sending* (before the server can see it). So a correct server,
//! which only grants the key to someone else after it has read our release,
//! can never make two beliefs overlap; causality through the sockets orders
//! the two atomic operations. A grant that finds the word incompatible is a
//! violation: the grant is counted and not recorded as a belief.
//!
//! Within one connection, requests in flight always name distinct keys (the
//! engine makes sure), so a key is never held twice by the same connection.

use std::sync::atomic::{AtomicU32, Ordering};

const EXCLUSIVE: u32 = 1 << 31;

/// How a connection holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Exclusive,
    Shared,
    /// `weight` permits of a semaphore of `capacity`.
    Permits {
        weight: u32,
        capacity: u32,
    },
}
/// Connection ids must stay below this (the low 31 bits of the word).
pub const CONN_ID_MAX: u32 = EXCLUSIVE - 1;

pub struct Holders {
    keys: Box<[AtomicU32]>,
}

impl Holders {
    pub fn new(keys: u32) -> Holders {
        Holders {
            keys: (0..keys).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Connection `conn` was granted `key`. Returns false (a violation) if
    /// the grant conflicts with what our other connections hold.
    pub fn grant(&self, key: u32, conn: u32, claim: Claim) -> bool {
        assert!(conn <= CONN_ID_MAX);
        let word = &self.keys[key as usize];
        let (weight, capacity) = match claim {
            Claim::Exclusive => {
                return word
                    .compare_exchange(0, EXCLUSIVE | conn, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            }
            Claim::Shared => (1, EXCLUSIVE - 1),
            Claim::Permits { weight, capacity } => (weight, capacity.min(EXCLUSIVE - 1)),
        };
        word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v & EXCLUSIVE == 0 && u64::from(v) + u64::from(weight) <= u64::from(capacity))
                .then(|| v + weight)
        })
        .is_ok()
    }

    /// Connection `conn` is about to send the release of `key`. A grant that
    /// was a violation was never recorded, so its release changes nothing.
    pub fn release(&self, key: u32, conn: u32, claim: Claim) {
        let word = &self.keys[key as usize];
        let weight = match claim {
            Claim::Exclusive => {
                let _ =
                    word.compare_exchange(EXCLUSIVE | conn, 0, Ordering::AcqRel, Ordering::Acquire);
                return;
            }
            Claim::Shared => 1,
            Claim::Permits { weight, .. } => weight,
        };
        let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v & EXCLUSIVE == 0 && v >= weight).then(|| v - weight)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: Claim = Claim::Exclusive;
    const S: Claim = Claim::Shared;

    #[test]
    fn exclusive_conflicts() {
        let h = Holders::new(4);
        assert!(h.grant(1, 7, X));
        assert!(!h.grant(1, 8, X), "second exclusive holder");
        assert!(!h.grant(1, 8, S), "reader while a writer holds");
        h.release(1, 8, X); // the violating grant's release: no effect
        assert!(!h.grant(1, 9, X));
        h.release(1, 7, X);
        assert!(h.grant(1, 9, X));
        assert!(h.grant(2, 9, X), "other keys are independent");
    }

    #[test]
    fn shared_counts_readers() {
        let h = Holders::new(1);
        assert!(h.grant(0, 1, S));
        assert!(h.grant(0, 2, S));
        assert!(!h.grant(0, 3, X), "writer while readers hold");
        h.release(0, 1, S);
        assert!(!h.grant(0, 3, X));
        h.release(0, 2, S);
        assert!(h.grant(0, 3, X));
    }

    #[test]
    fn permits_count_up_to_the_capacity() {
        let h = Holders::new(1);
        let permits = |weight| Claim::Permits {
            weight,
            capacity: 4,
        };
        assert!(h.grant(0, 1, permits(3)));
        assert!(!h.grant(0, 2, permits(2)), "5 of 4");
        assert!(h.grant(0, 2, permits(1)));
        assert!(!h.grant(0, 3, X), "exclusive while permits are out");
        h.release(0, 1, permits(3));
        assert!(h.grant(0, 3, permits(3)));
    }
}
