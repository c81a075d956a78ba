//! Property test: one ACQUIRE_ALL's step machine (`state::multi::Multi`)
//! against a tiny reference model of the promise it keeps.
//!
//! The model: the names are asked for one at a time in byte order; each
//! asked name is granted or not; a part may be taken away (an operator) or
//! the request cancelled at any moment. The request ends granted — with
//! every name's token, in the request's order — only if every name was
//! granted and nothing happened to it; otherwise it gives back exactly the
//! names it was granted and still holds (not a part taken away), one
//! release each, and only then answers the failure: the first failure's
//! outcome, or Cancelled (a cancel, a part lost), or Deadlock (its wait
//! was failed while nothing else had happened). All or nothing: the client
//! is never answered while any part is held for a failed request.

use livelock::lock_table::{Mode, Outcome, Wait};
use livelock::multi::{self, Failure, Multi, Step};
use livelock::protocol::AllNames;
use livelock::session::LockName;
use proptest::prelude::*;

const NAMES: [&str; 6] = ["a", "b", "c", "jobs/1", "jobs/2", "z"];

/// What happens next to the request, as its home sees it.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// The name asked for now is granted.
    Grant,
    /// It is refused (Busy, TimedOut, Cancelled by the shard...).
    Refuse(u8),
    /// Its wait is failed (deadlock detection, or the home's Abort).
    FailWait,
    /// A part already granted (the i-th, mod how many) is taken away.
    Lose(usize),
    /// The client cancels it.
    Cancel,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => Just(Event::Grant),
        1 => (0u8..3).prop_map(Event::Refuse),
        1 => Just(Event::FailWait),
        1 => (0usize..8).prop_map(Event::Lose),
        1 => Just(Event::Cancel),
    ]
}

fn refusal(code: u8) -> Outcome {
    [Outcome::Busy, Outcome::TimedOut, Outcome::Cancelled][usize::from(code)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_multi_lock_is_all_or_nothing(
        picks in prop::sample::subsequence(NAMES.to_vec(), 1..=NAMES.len()),
        shuffle in prop::collection::vec(any::<u8>(), 6),
        shared in prop::collection::vec(any::<bool>(), 6),
        events in prop::collection::vec(event(), 0..24),
    ) {
        // The request's order: the picks, shuffled.
        let mut request: Vec<(&str, Mode)> = picks
            .iter()
            .zip(&shared)
            .map(|(n, &s)| (*n, if s { Mode::Shared } else { Mode::Exclusive }))
            .collect();
        for (i, &r) in shuffle.iter().enumerate().take(request.len()) {
            let j = usize::from(r) % request.len();
            request.swap(i, j);
        }
        let list: Vec<(Mode, &[u8])> = request.iter().map(|(n, m)| (*m, n.as_bytes())).collect();
        let mut bytes = Vec::new();
        AllNames::encode(&list, &mut bytes);
        let all = AllNames::parse(list.len() as u16, &bytes).unwrap();
        let mut multi = Multi::new(multi::Request::All(all), Wait::Forever);

        // The model's view.
        let mut sorted: Vec<&str> = request.iter().map(|(n, _)| *n).collect();
        sorted.sort_unstable();
        let mut held: Vec<(&str, u64)> = Vec::new(); // granted and still ours
        let mut asked_next = 0; // the names asked for so far, in byte order
        let mut doomed = false;
        let mut next_token = 100;
        let mut step = multi.start();
        let mut answered: Option<Result<Vec<u64>, Failure>> = None;
        let mut releasing: Vec<(LockName, u64)> = Vec::new();

        for ev in events {
            if answered.is_some() {
                break;
            }
            // Giving back: every release is answered, then the failure.
            if !releasing.is_empty() {
                releasing.pop();
                step = multi.on_outcome(Outcome::Ok);
                match &step {
                    Step::Wait => prop_assert!(!releasing.is_empty()),
                    Step::Failed(f) => {
                        prop_assert!(releasing.is_empty(), "answered before every release");
                        answered = Some(Err(f.clone()));
                    }
                    other => prop_assert!(false, "while giving back: {other:?}"),
                }
                continue;
            }
            let Step::Acquire(multi::Take { name, .. }) = &step else {
                prop_assert!(false, "no acquire in flight: {step:?}");
                unreachable!()
            };
            // Asked in byte order, each once.
            let asked = sorted[asked_next];
            prop_assert_eq!(&**name, asked.as_bytes());
            let next = match ev {
                Event::Grant => {
                    next_token += 1;
                    asked_next += 1;
                    held.push((asked, next_token));
                    multi.on_outcome(Outcome::Granted { token: next_token })
                }
                Event::Refuse(code) => multi.on_outcome(refusal(code)),
                Event::FailWait => multi.on_deadlock(b"cycle".to_vec()),
                Event::Lose(i) if !held.is_empty() => {
                    let (name, token) = held.remove(i % held.len());
                    prop_assert!(multi.on_lost(name.as_bytes(), token));
                    doomed = true;
                    Step::Wait
                }
                Event::Lose(_) => Step::Wait,
                Event::Cancel => {
                    prop_assert!(multi.cancel());
                    doomed = true;
                    Step::Wait
                }
            };
            match next {
                Step::Wait => {} // the acquire in flight goes on
                Step::Acquire(..) => {
                    prop_assert!(!doomed, "a doomed request asks for more");
                    step = next;
                }
                Step::Granted(body) => {
                    let tokens: Vec<u64> = body
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    prop_assert!(!doomed);
                    prop_assert_eq!(held.len(), request.len(), "granted with a part missing");
                    // One token per name, in the request's order.
                    let want: Vec<u64> = request
                        .iter()
                        .map(|(n, _)| held.iter().find(|(h, _)| h == n).unwrap().1)
                        .collect();
                    prop_assert_eq!(&tokens, &want);
                    answered = Some(Ok(tokens));
                }
                Step::Release(list) => {
                    // Exactly the parts still ours.
                    let mut want: Vec<(LockName, u64)> = held
                        .iter()
                        .map(|(n, t)| (LockName::from_slice(n.as_bytes()), *t))
                        .collect();
                    let mut got = list.clone();
                    want.sort();
                    got.sort();
                    prop_assert_eq!(got, want);
                    releasing = list;
                }
                Step::Failed(f) => {
                    prop_assert!(held.is_empty(), "answered a failure while holding parts");
                    if doomed {
                        prop_assert_eq!(&f, &Failure::Outcome(Outcome::Cancelled));
                    }
                    answered = Some(Err(f));
                }
                Step::Abort => prop_assert!(false, "Abort is the home's, not the machine's"),
            }
        }
        // A granted request answered every name; a failed one holds none.
        if let Some(Err(_)) = answered {
            prop_assert!(releasing.is_empty());
        }
    }
}
