//! Property test: one ACQUIRE_POOL's step machine (`state::multi::Multi`
//! with a pool request) against a tiny reference model of its promise.
//!
//! The model: random requirements (K of N candidates from a small set of
//! names, tags, a filter that leaves at least K) and a world in which some
//! names are taken by others. The machine must ask for every requirement's
//! pool queue first (K permits of as many as its filter leaves), then
//! candidates that match their requirement's filter, in strictly ascending
//! byte order; try a candidate (Wait::Try) exactly while more of its
//! requirement's candidates remain than it still needs, and wait for it
//! (the request's wait) only when it is the last chance; never ask for one
//! its requirement no longer needs. A taken candidate tried is passed over.
//! It ends granted — each requirement exactly K distinct matching
//! candidates, the grant naming them with their tokens, in candidate order
//! — or failed, after giving back exactly what it holds, one release each.

use std::collections::{BTreeMap, BTreeSet};

use livelock::lock_table::{Mode, Outcome, Wait};
use livelock::multi::{self, Failure, Multi, Step, Take};
use livelock::pool::{self, PoolSpec};
use livelock::session::LockName;
use proptest::prelude::*;

const NAMES: [&str; 8] = ["a", "b", "c", "d", "gpu/1", "gpu/2", "m", "z"];
const TAGS: [&str; 3] = ["", "t=1", "t=1,s=2"];
const FILTERS: [&str; 3] = ["", "t=1", "s=2"];

/// One requirement as generated: (need, filter index, [(name index, tag index)]).
type Generated = (u16, usize, Vec<(usize, usize)>);

fn requirements() -> impl Strategy<Value = Vec<Generated>> {
    // Distinct names over all requirements: a shuffled split of NAMES.
    (
        Just((0..NAMES.len()).collect::<Vec<usize>>()).prop_shuffle(),
        prop::collection::vec((1usize..4, 0usize..3, 1u16..4), 1..4),
        prop::collection::vec(0usize..3, NAMES.len()),
    )
        .prop_map(|(order, shapes, tags)| {
            let mut next = 0;
            let mut out = Vec::new();
            for (n, filter, need) in shapes {
                let names: Vec<usize> = order.iter().skip(next).take(n).copied().collect();
                next += names.len();
                if names.is_empty() {
                    break;
                }
                let candidates: Vec<(usize, usize)> = names.iter().map(|&i| (i, tags[i])).collect();
                out.push((need, filter, candidates));
            }
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_pool_request_keeps_its_promise(
        generated in requirements(),
        taken in prop::collection::vec(any::<bool>(), NAMES.len()),
        // The fate of each wait: 0..6 granted, 6 timed out, 7 cancelled.
        fates in prop::collection::vec(0u8..8, 16),
        forever in any::<bool>(),
    ) {
        // Requirements whose filter leaves fewer than K are the server's
        // to refuse (OverCapacity): lower K to what is left, or skip.
        let matches = |tags: usize, filter: usize| pool::tags_match(TAGS[tags].as_bytes(), FILTERS[filter].as_bytes());
        let reqs: Vec<Generated> = generated
            .into_iter()
            .filter_map(|(need, filter, c)| {
                let left = c.iter().filter(|(_, t)| matches(*t, filter)).count() as u16;
                (left > 0).then(|| (need.min(left), filter, c))
            })
            .collect();
        prop_assume!(!reqs.is_empty());
        let mut bytes = Vec::new();
        for (need, filter, c) in &reqs {
            let list: Vec<(&[u8], &[u8])> =
                c.iter().map(|&(n, t)| (NAMES[n].as_bytes(), TAGS[t].as_bytes())).collect();
            PoolSpec::encode(*need, FILTERS[*filter].as_bytes(), &list, &mut bytes);
        }
        let spec = PoolSpec::parse(reqs.len() as u16, &bytes).expect("well-formed");
        prop_assert_eq!(spec.short_requirement(), None);
        let wait = if forever { Wait::Forever } else { Wait::Until(1000) };
        let mut m = Multi::new(multi::Request::Pool(spec), wait);

        // The model's view: per requirement its matching candidates (by name).
        let matching: Vec<BTreeSet<&str>> = reqs
            .iter()
            .map(|(_, f, c)| c.iter().filter(|(_, t)| matches(*t, *f)).map(|(n, _)| NAMES[*n]).collect())
            .collect();
        let owner = |name: &str| matching.iter().position(|set| set.contains(name));
        let queues: BTreeMap<Vec<u8>, usize> = reqs
            .iter()
            .enumerate()
            .filter(|(r, (need, _, _))| matching[*r].len() > usize::from(*need))
            .map(|(r, _)| {
                let names: Vec<&[u8]> = matching[r].iter().map(|n| n.as_bytes()).collect();
                (multi::queue_name(&names).to_vec(), r)
            })
            .collect();
        let mut got: Vec<Vec<(String, u64)>> = vec![Vec::new(); reqs.len()];
        let mut passed: Vec<usize> = vec![0; reqs.len()];
        let mut held: Vec<(LockName, u64)> = Vec::new();
        let mut queues_taken = 0;
        let mut last_candidate: Option<String> = None;
        let mut fates = fates.into_iter();
        let mut token = 100;
        let mut step = m.start();
        loop {
            match step {
                Step::Acquire(Take { name, mode, weight, capacity, wait: w, tags }) => {
                    let text = String::from_utf8(name.to_vec()).unwrap();
                    token += 1;
                    if let Some(&r) = queues.get(&name.to_vec()) {
                        // Queues first, all of them, K of as many as match.
                        prop_assert!(last_candidate.is_none(), "a queue after a candidate");
                        prop_assert_eq!(mode, Mode::Permits);
                        prop_assert_eq!(weight, u32::from(reqs[r].0));
                        prop_assert_eq!(capacity as usize, matching[r].len());
                        prop_assert_eq!(w, wait);
                        prop_assert!(tags.is_empty());
                        queues_taken += 1;
                        held.push((name, token));
                        step = m.on_outcome(Outcome::Granted { token });
                        continue;
                    }
                    prop_assert_eq!(queues_taken, queues.len(), "a candidate before every queue");
                    let r = owner(&text).expect("a matching candidate");
                    prop_assert!(last_candidate.as_deref() < Some(text.as_str()), "byte order");
                    last_candidate = Some(text.clone());
                    prop_assert_eq!(mode, Mode::Exclusive);
                    // Its tags go with it (usage reports per tag).
                    let sent = reqs[r].2.iter().find(|(n, _)| NAMES[*n] == text).unwrap();
                    prop_assert_eq!(&*tags, TAGS[sent.1].as_bytes());
                    let need = usize::from(reqs[r].0);
                    let still = need - got[r].len();
                    prop_assert!(still > 0, "asked for one its requirement does not need");
                    // Candidates of r left including this one.
                    let left = matching[r].len() - passed[r];
                    passed[r] += 1;
                    let is_taken = taken[NAMES.iter().position(|n| *n == text).unwrap()];
                    if left > still {
                        prop_assert_eq!(w, Wait::Try, "tried while more remain");
                        step = match is_taken {
                            true => m.on_outcome(Outcome::Busy),
                            false => {
                                got[r].push((text, token));
                                held.push((name, token));
                                m.on_outcome(Outcome::Granted { token })
                            }
                        };
                    } else {
                        prop_assert_eq!(w, wait, "waited for when the last chance");
                        let fate = if is_taken { fates.next().unwrap_or(6) } else { 0 };
                        step = match fate {
                            0..=5 => {
                                got[r].push((text, token));
                                held.push((name, token));
                                m.on_outcome(Outcome::Granted { token })
                            }
                            6 => m.on_outcome(Outcome::TimedOut),
                            _ => {
                                prop_assert!(m.cancel());
                                m.on_outcome(Outcome::Cancelled)
                            }
                        };
                    }
                }
                Step::Granted(body) => {
                    let needs: Vec<u16> = reqs.iter().map(|(n, _, _)| *n).collect();
                    let grant = pool::parse_grant(&body, &needs).expect("a well-formed grant");
                    for (r, g) in grant.iter().enumerate() {
                        prop_assert_eq!(got[r].len(), usize::from(reqs[r].0), "exactly K");
                        let names: Vec<(String, u64)> = g
                            .taken
                            .iter()
                            .map(|&(i, t)| (NAMES[reqs[r].2[usize::from(i)].0].to_string(), t))
                            .collect();
                        let mut want = got[r].clone();
                        // Candidate order, as sent.
                        let position = |n: &str| reqs[r].2.iter().position(|(x, _)| NAMES[*x] == n);
                        want.sort_by_key(|(n, _)| position(n));
                        prop_assert_eq!(names, want);
                        prop_assert_eq!(g.permits.is_some(), queues.values().any(|&q| q == r));
                    }
                    prop_assert_eq!(m.taken().count(), held.len());
                    break;
                }
                Step::Release(list) => {
                    let mut want = held.clone();
                    let mut list = list;
                    want.sort();
                    list.sort();
                    prop_assert_eq!(&list, &want, "gives back exactly what it holds");
                    let mut answer = Step::Wait;
                    for _ in &list {
                        prop_assert_eq!(answer, Step::Wait, "answered before the last release");
                        answer = m.on_outcome(Outcome::Ok);
                    }
                    prop_assert!(matches!(answer, Step::Failed(_)));
                    break;
                }
                Step::Failed(f) => {
                    prop_assert!(held.is_empty(), "failed while holding");
                    prop_assert!(matches!(f, Failure::Outcome(_)));
                    break;
                }
                other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
            }
        }
    }
}
