//! A session's declared lock order (sharedlock's ordered locking), shared
//! by the pure core, the wire format and the client: what an order is, its
//! one byte encoding (the SET_ORDER body, the dump's and the log's), and the
//! rank that decides whether an acquire keeps to it.
//!
//! A session that declared an order may only acquire a name that ranks
//! after every name it holds, one acquire at a time; sessions that keep to one order
//! cannot deadlock each other (every wait goes up the order, so no cycle).
//!
//! Encoding (little-endian): `kind u8` (0 none, 1 names in ascending byte
//! order, 2 priorities), `reserved u8` (0), `count u16`; then, for kind 2
//! only, `count` (1..=[`ORDER_NAMES_MAX`]) entries `priority u32,
//! name_len u16, name` with distinct names of 1..=`NAME_LEN_MAX` bytes,
//! the whole encoding at most [`FRAME_BODY_MAX`] bytes (it is one frame's
//! body, and a log record's).

use std::collections::BTreeMap;

use crate::limits::{FRAME_BODY_MAX, NAME_LEN_MAX};

/// Most names one priority order may list.
pub const ORDER_NAMES_MAX: usize = 256;

/// How a session orders its acquires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Names in ascending byte order.
    Ascending,
    /// Lower priority first; names with the same priority, and names not
    /// listed (after every listed one), in ascending byte order.
    Priorities(BTreeMap<Box<[u8]>, u32>),
}

/// Where a name stands in an order: compared as a tuple.
pub type Rank<'n> = (u32, &'n [u8]);

impl Order {
    /// A priority order from `(name, priority)` pairs; `None` if one is
    /// not a valid name, a name is listed twice, there are none or more
    /// than [`ORDER_NAMES_MAX`], or the encoding would be longer than
    /// [`FRAME_BODY_MAX`].
    pub fn priorities<N: AsRef<[u8]>>(
        entries: impl IntoIterator<Item = (N, u32)>,
    ) -> Option<Order> {
        let mut map = BTreeMap::new();
        let mut encoded = 4;
        for (name, priority) in entries {
            let name = name.as_ref();
            encoded += 6 + name.len();
            if !(1..=NAME_LEN_MAX).contains(&name.len())
                || map.insert(Box::from(name), priority).is_some()
                || map.len() > ORDER_NAMES_MAX
                || encoded > FRAME_BODY_MAX
            {
                return None;
            }
        }
        (!map.is_empty()).then_some(Order::Priorities(map))
    }

    /// Where `name` stands.
    pub fn rank<'n>(&self, name: &'n [u8]) -> Rank<'n> {
        match self {
            Order::Ascending => (0, name),
            Order::Priorities(map) => (map.get(name).copied().unwrap_or(u32::MAX), name),
        }
    }

    /// Appends the encoding of `order` (`None`: no order).
    pub fn encode(order: Option<&Order>, out: &mut Vec<u8>) {
        match order {
            None => out.extend_from_slice(&[0, 0, 0, 0]),
            Some(Order::Ascending) => out.extend_from_slice(&[1, 0, 0, 0]),
            Some(Order::Priorities(map)) => {
                let count = u16::try_from(map.len()).expect("at most ORDER_NAMES_MAX");
                out.extend_from_slice(&[2, 0]);
                out.extend_from_slice(&count.to_le_bytes());
                for (name, priority) in map {
                    let len = u16::try_from(name.len()).expect("a name fits u16");
                    out.extend_from_slice(&priority.to_le_bytes());
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(name);
                }
            }
        }
    }

    /// Reads an encoding off the front of `bytes`: the order (`None`: no
    /// order) and the bytes after it; `Err(())` if it is not one.
    #[allow(clippy::result_unit_err)]
    pub fn decode(bytes: &[u8]) -> Result<(Option<Order>, &[u8]), ()> {
        let (head, mut rest) = bytes.split_first_chunk::<4>().ok_or(())?;
        let count = usize::from(u16::from_le_bytes([head[2], head[3]]));
        match (head[0], head[1], count) {
            (0, 0, 0) => return Ok((None, rest)),
            (1, 0, 0) => return Ok((Some(Order::Ascending), rest)),
            (2, 0, 1..=ORDER_NAMES_MAX) => {}
            _ => return Err(()),
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let (fixed, after) = rest.split_first_chunk::<6>().ok_or(())?;
            let priority = u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
            let len = usize::from(u16::from_le_bytes([fixed[4], fixed[5]]));
            if after.len() < len {
                return Err(());
            }
            let (name, after) = after.split_at(len);
            entries.push((name, priority));
            rest = after;
        }
        let order = Order::priorities(entries).ok_or(())?;
        Ok((Some(order), rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_and_bad_ones_are_refused() {
        let orders = [
            None,
            Some(Order::Ascending),
            Order::priorities([(&b"b"[..], 1), (b"a", 2), (b"c", 2)]),
        ];
        for order in &orders {
            let mut bytes = Vec::new();
            Order::encode(order.as_ref(), &mut bytes);
            bytes.push(0xEE);
            assert_eq!(Order::decode(&bytes), Ok((order.clone(), &[0xEE][..])));
        }
        let mut one = Vec::new();
        Order::encode(Order::priorities([("x", 7)]).as_ref(), &mut one);
        assert_eq!(one, [2, 0, 1, 0, 7, 0, 0, 0, 1, 0, b'x']);
        for bad in [
            &[][..],
            &[3, 0, 0, 0],
            &[1, 1, 0, 0],
            &[1, 0, 1, 0],
            &[2, 0, 0, 0],
            &[2, 0, 1, 0, 7, 0, 0, 0, 2, 0, b'x'],
            &[2, 0, 1, 0, 7, 0, 0, 0, 0, 0],
            &[2, 0, 2, 0, 7, 0, 0, 0, 1, 0, b'x', 8, 0, 0, 0, 1, 0, b'x'],
        ] {
            assert_eq!(Order::decode(bad), Err(()), "{bad:?}");
        }
        assert!(
            Order::priorities((0..=ORDER_NAMES_MAX as u32).map(|i| (i.to_string(), i))).is_none()
        );
        // The encoding is one frame body at most: 3 long names fit, not 4
        // (each takes 6 + 1024 bytes).
        let long = |i: u8| (vec![i; NAME_LEN_MAX], u32::from(i));
        let fits = Order::priorities((0..3).map(long)).unwrap();
        let mut bytes = Vec::new();
        Order::encode(Some(&fits), &mut bytes);
        assert!(bytes.len() <= FRAME_BODY_MAX);
        assert!(Order::priorities((0..4).map(long)).is_none());
    }

    #[test]
    fn ranks_go_by_priority_then_name() {
        let order = Order::priorities([(&b"z"[..], 1), (b"a", 2)]).unwrap();
        assert!(order.rank(b"z") < order.rank(b"a"));
        assert!(
            order.rank(b"a") < order.rank(b"b"),
            "unlisted names come last"
        );
        assert!(order.rank(b"b") < order.rank(b"c"));
        assert!(Order::Ascending.rank(b"a") < Order::Ascending.rank(b"b"));
    }
}
