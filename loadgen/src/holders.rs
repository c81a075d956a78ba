//! The generator's own view of who holds each key, to catch a server that
//! grants a lock twice.
//!
//! One atomic word per key, shared by every thread:
//! - `0`: none of our connections believes it holds the key;
//! - `EXCLUSIVE | conn`: connection `conn` holds it exclusively;
//! - `n` in `1..EXCLUSIVE`: `n` of our connections hold it shared.
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
    pub fn grant(&self, key: u32, conn: u32, shared: bool) -> bool {
        assert!(conn <= CONN_ID_MAX);
        let word = &self.keys[key as usize];
        if shared {
            word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & EXCLUSIVE == 0).then_some(v + 1)
            })
            .is_ok()
        } else {
            word.compare_exchange(0, EXCLUSIVE | conn, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }
    }

    /// Connection `conn` is about to send the release of `key`. A grant that
    /// was a violation was never recorded, so its release changes nothing.
    pub fn release(&self, key: u32, conn: u32, shared: bool) {
        let word = &self.keys[key as usize];
        if shared {
            let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & EXCLUSIVE == 0 && v > 0).then(|| v - 1)
            });
        } else {
            let _ = word.compare_exchange(EXCLUSIVE | conn, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_conflicts() {
        let h = Holders::new(4);
        assert!(h.grant(1, 7, false));
        assert!(!h.grant(1, 8, false), "second exclusive holder");
        assert!(!h.grant(1, 8, true), "reader while a writer holds");
        h.release(1, 8, false); // the violating grant's release: no effect
        assert!(!h.grant(1, 9, false));
        h.release(1, 7, false);
        assert!(h.grant(1, 9, false));
        assert!(h.grant(2, 9, false), "other keys are independent");
    }

    #[test]
    fn shared_counts_readers() {
        let h = Holders::new(1);
        assert!(h.grant(0, 1, true));
        assert!(h.grant(0, 2, true));
        assert!(!h.grant(0, 3, false), "writer while readers hold");
        h.release(0, 1, true);
        assert!(!h.grant(0, 3, false));
        h.release(0, 2, true);
        assert!(h.grant(0, 3, false));
    }
}
