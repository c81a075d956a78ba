//! The body of an ACQUIRE_POOL ("K of these N" resource pools) and its
//! granted reply, as bytes: parsing with every check, encoding for the
//! clients, and the tag filter's matching rule. No state.
//!
//! Request, after the fixed `AllBody` (whose `count` is the number of
//! requirements), per requirement:
//!
//! ```text
//! need u16 (K >= 1), candidates u16 (N >= K), filter_len u16, filter
//! per candidate: name_len u16, tags_len u16, name, tags
//! ```
//!
//! Tags and filters are text: `key=value` pairs joined by `,`
//! (`model=T1000,site=lab2`); a key is not empty and has neither `=` nor
//! `,`; a value has no `,`. A candidate matches a filter when it has every
//! pair of the filter (the empty filter matches all). Candidate names are
//! distinct across the whole request.
//!
//! Granted reply body, per requirement in the request's order:
//!
//! ```text
//! permits_token u64 (0: no pool queue), queue_len u16, queue name,
//! per resource taken (K, in candidate order): index u16 (into the
//! requirement's candidates as sent), token u64
//! ```

use crate::limits::{NAME_LEN_MAX, POOL_CANDIDATES_MAX, POOL_REQUIREMENTS_MAX, TAGS_LEN_MAX};

/// The requirements of an ACQUIRE_POOL, checked when made (`parse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec<'a> {
    count: u16,
    bytes: &'a [u8],
}

/// One requirement: take `need` of `candidates` that match `filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement<'a> {
    pub need: u16,
    pub filter: &'a [u8],
    /// (name, tags), as sent.
    pub candidates: Vec<(&'a [u8], &'a [u8])>,
}

impl Requirement<'_> {
    /// Indices of the candidates the filter admits, in the order sent.
    pub fn matching(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.candidates.len()).filter(|&i| tags_match(self.candidates[i].1, self.filter))
    }
}

/// Whether `tags` has every `key=value` pair of `filter`.
pub fn tags_match(tags: &[u8], filter: &[u8]) -> bool {
    pairs(filter).all(|want| pairs(tags).any(|have| have == want))
}

/// The `key=value` pairs of a tag text (empty text: none).
pub fn pairs(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| b == b',').filter(|p| !p.is_empty())
}

/// Whether `text` is a well-formed tag list (or filter).
pub fn tags_valid(text: &[u8]) -> bool {
    text.len() <= TAGS_LEN_MAX
        && (text.is_empty()
            || text.split(|&b| b == b',').all(|pair| {
                let mut parts = pair.splitn(2, |&b| b == b'=');
                let key = parts.next().unwrap_or_default();
                !key.is_empty() && parts.next().is_some()
            }))
}

fn take_u16(rest: &mut &[u8]) -> Option<u16> {
    let (head, after) = rest.split_first_chunk::<2>()?;
    *rest = after;
    Some(u16::from_le_bytes(*head))
}

fn take_bytes<'a>(rest: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
    if rest.len() < len {
        return None;
    }
    let (taken, after) = rest.split_at(len);
    *rest = after;
    Some(taken)
}

impl<'a> PoolSpec<'a> {
    /// `count` requirements in `bytes`, checked: 1..=`POOL_REQUIREMENTS_MAX`
    /// requirements, each 1 <= need <= candidates, at most
    /// `POOL_CANDIDATES_MAX` candidates in all with distinct valid names,
    /// well-formed tags and filters, nothing after. `None` if not.
    pub fn parse(count: u16, bytes: &'a [u8]) -> Option<PoolSpec<'a>> {
        if !(1..=POOL_REQUIREMENTS_MAX).contains(&usize::from(count)) {
            return None;
        }
        let spec = PoolSpec { count, bytes };
        let mut rest = bytes;
        let mut seen = hashbrown::HashSet::new();
        for _ in 0..count {
            let requirement = Self::take_requirement(&mut rest)?;
            let n = requirement.candidates.len();
            if requirement.need == 0 || usize::from(requirement.need) > n {
                return None;
            }
            for (name, _) in requirement.candidates {
                if seen.len() == POOL_CANDIDATES_MAX || !seen.insert(name) {
                    return None;
                }
            }
        }
        rest.is_empty().then_some(spec)
    }

    fn take_requirement(rest: &mut &'a [u8]) -> Option<Requirement<'a>> {
        let need = take_u16(rest)?;
        let n = take_u16(rest)?;
        let filter_len = take_u16(rest)?;
        let filter = take_bytes(rest, usize::from(filter_len))?;
        if !tags_valid(filter) || usize::from(n) > POOL_CANDIDATES_MAX {
            return None;
        }
        let mut candidates = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let name_len = usize::from(take_u16(rest)?);
            let tags_len = usize::from(take_u16(rest)?);
            let name = take_bytes(rest, name_len)?;
            let tags = take_bytes(rest, tags_len)?;
            if !(1..=NAME_LEN_MAX).contains(&name_len) || !tags_valid(tags) {
                return None;
            }
            candidates.push((name, tags));
        }
        Some(Requirement {
            need,
            filter,
            candidates,
        })
    }

    /// The requirements in the request's order.
    pub fn requirements(&self) -> impl Iterator<Item = Requirement<'a>> {
        let mut rest = self.bytes;
        (0..self.count).map(move |_| Self::take_requirement(&mut rest).expect("checked by parse"))
    }

    /// Every candidate name, all requirements.
    pub fn names(&self) -> impl Iterator<Item = &'a [u8]> {
        self.requirements()
            .flat_map(|r| r.candidates.into_iter().map(|(name, _)| name))
    }

    /// The first requirement (index) whose filter leaves fewer candidates
    /// than it needs: the request can never be granted.
    pub fn short_requirement(&self) -> Option<usize> {
        self.requirements()
            .position(|r| r.matching().count() < usize::from(r.need))
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    /// The encoded requirements (what `encode` wrote).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Appends the encoding of one requirement: take `need` of
    /// `candidates` ((name, tags)) that match `filter`.
    pub fn encode(need: u16, filter: &[u8], candidates: &[(&[u8], &[u8])], out: &mut Vec<u8>) {
        let len = |n: usize| u16::try_from(n).unwrap_or(u16::MAX).to_le_bytes();
        out.extend_from_slice(&need.to_le_bytes());
        out.extend_from_slice(&len(candidates.len()));
        out.extend_from_slice(&len(filter.len()));
        out.extend_from_slice(filter);
        for (name, tags) in candidates {
            out.extend_from_slice(&len(name.len()));
            out.extend_from_slice(&len(tags.len()));
            out.extend_from_slice(name);
            out.extend_from_slice(tags);
        }
    }
}

/// What one requirement of a granted ACQUIRE_POOL got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequirementGrant {
    /// The pool queue's permits this grant holds (released after the
    /// resources), if the requirement had one.
    pub permits: Option<(Vec<u8>, u64)>,
    /// (index into the requirement's candidates, token), candidate order.
    pub taken: Vec<(u16, u64)>,
}

/// Appends one requirement's part of a granted reply.
pub fn encode_grant(grant: &RequirementGrant, out: &mut Vec<u8>) {
    let (queue, token) = match &grant.permits {
        Some((queue, token)) => (&queue[..], *token),
        None => (&[][..], 0),
    };
    out.extend_from_slice(&token.to_le_bytes());
    let len = u16::try_from(queue.len()).expect("a lock name");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(queue);
    for (index, token) in &grant.taken {
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&token.to_le_bytes());
    }
}

/// A granted reply's body, given each requirement's need (K) in order.
pub fn parse_grant(mut body: &[u8], needs: &[u16]) -> Option<Vec<RequirementGrant>> {
    let mut grants = Vec::with_capacity(needs.len());
    for &need in needs {
        let token = u64::from_le_bytes(*take_bytes(&mut body, 8)?.first_chunk::<8>()?);
        let queue_len = usize::from(take_u16(&mut body)?);
        let queue = take_bytes(&mut body, queue_len)?;
        let permits = match (token, queue_len) {
            (0, 0) => None,
            (0, _) | (_, 0) => return None,
            _ => Some((queue.to_vec(), token)),
        };
        let mut taken = Vec::with_capacity(usize::from(need));
        for _ in 0..need {
            let index = take_u16(&mut body)?;
            let token = u64::from_le_bytes(*take_bytes(&mut body, 8)?.first_chunk::<8>()?);
            taken.push((index, token));
        }
        grants.push(RequirementGrant { permits, taken });
    }
    body.is_empty().then_some(grants)
}

/// A requirement as tests write it: (need, filter, [(name, tags)]).
#[cfg(test)]
pub(crate) type RequirementText<'a> = (u16, &'a str, &'a [(&'a str, &'a str)]);

/// The encoding of requirements written as text (tests).
#[cfg(test)]
pub(crate) fn spec_bytes(reqs: &[RequirementText<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (need, filter, candidates) in reqs {
        let list: Vec<(&[u8], &[u8])> = candidates
            .iter()
            .map(|(n, t)| (n.as_bytes(), t.as_bytes()))
            .collect();
        PoolSpec::encode(*need, filter.as_bytes(), &list, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A good body round-trips; each rule of `parse` refuses its case.
    #[test]
    fn parse_checks_every_rule() {
        let good = spec_bytes(&[
            (
                2,
                "model=T1",
                &[
                    ("a", "model=T1"),
                    ("b", "model=T2"),
                    ("c", "model=T1,site=x"),
                ],
            ),
            (1, "", &[("d", "")]),
        ]);
        let spec = PoolSpec::parse(2, &good).expect("well-formed");
        let reqs: Vec<_> = spec.requirements().collect();
        assert_eq!(reqs[0].need, 2);
        assert_eq!(reqs[0].matching().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(reqs[1].candidates, vec![(&b"d"[..], &b""[..])]);
        assert_eq!(
            spec.names().collect::<Vec<_>>(),
            vec![&b"a"[..], b"b", b"c", b"d"]
        );

        assert!(PoolSpec::parse(1, &good).is_none(), "bytes left over");
        assert!(PoolSpec::parse(3, &good).is_none(), "too few bytes");
        assert!(PoolSpec::parse(0, &[]).is_none(), "no requirement");
        for bad in [
            spec_bytes(&[(0, "", &[("a", "")])]),
            spec_bytes(&[(2, "", &[("a", "")])]),
            spec_bytes(&[(1, "", &[("a", ""), ("a", "")])]),
            spec_bytes(&[(1, "", &[("a", "")]), (1, "", &[("a", "")])]),
            spec_bytes(&[(1, "", &[("", "")])]),
            spec_bytes(&[(1, "=x", &[("a", "")])]),
            spec_bytes(&[(1, "", &[("a", "novalue")])]),
            spec_bytes(&[(1, "", &[("a", "k=v,")])]),
        ] {
            assert!(PoolSpec::parse(1, &bad).is_none() && PoolSpec::parse(2, &bad).is_none());
        }
        let many: Vec<String> = (0..=POOL_CANDIDATES_MAX).map(|i| format!("n{i}")).collect();
        let list: Vec<(&str, &str)> = many.iter().map(|n| (n.as_str(), "")).collect();
        assert!(PoolSpec::parse(1, &spec_bytes(&[(1, "", &list)])).is_none());
        assert!(PoolSpec::parse(1, &spec_bytes(&[(1, "", &list[1..])])).is_some());
        let long = "k=".to_string() + &"v".repeat(TAGS_LEN_MAX);
        assert!(PoolSpec::parse(1, &spec_bytes(&[(1, "", &[("a", &long)])])).is_none());
    }

    /// A filter matches a candidate that has each of its pairs, whole.
    #[test]
    fn filters_match_whole_pairs() {
        assert!(tags_match(b"model=T1,site=x", b""));
        assert!(tags_match(b"model=T1,site=x", b"site=x,model=T1"));
        assert!(!tags_match(b"model=T10", b"model=T1"));
        assert!(!tags_match(b"", b"model=T1"));
        assert!(tags_valid(b"k="), "an empty value");
    }

    /// A grant round-trips; a body of another shape is refused.
    #[test]
    fn grants_round_trip() {
        let grants = vec![
            RequirementGrant {
                permits: Some((b"pool:1".to_vec(), 7)),
                taken: vec![(0, 8), (2, 9)],
            },
            RequirementGrant {
                permits: None,
                taken: vec![(0, 10)],
            },
        ];
        let mut body = Vec::new();
        grants.iter().for_each(|g| encode_grant(g, &mut body));
        assert_eq!(parse_grant(&body, &[2, 1]), Some(grants));
        assert_eq!(parse_grant(&body, &[2]), None);
        assert_eq!(parse_grant(&body, &[2, 2]), None);
        assert_eq!(parse_grant(&body[..body.len() - 1], &[2, 1]), None);
    }
}
