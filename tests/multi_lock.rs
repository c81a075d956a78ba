//! Atomic multi-lock (ACQUIRE_ALL) over real sockets: all names or none,
//! tokens in the request's order, FIFO with single acquires, a try or a
//! timeout gives back what it took, the session's end (kill) frees a
//! half-taken set, and many clients taking overlapping sets in every order
//! never deadlock and never overlap. `livelock run --all` holds the set
//! while COMMAND runs (tokens in LIVELOCK_FENCE) and a kill -9 of it frees
//! every name. Across a crash of a `--durability log`
//! server (kill -9) a multi-lock in flight starts over and is answered on
//! the resumed session, with nothing of it held or listed meanwhile.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    bounded, data_dir, free_addr, graceful, holders, livelock_bin, queued, start_server_with,
    wait_until, ChildGuard, RawConn, ScratchDir, Stamps, TestServer, WAIT_MAX,
};
use livelock::client::{Client, Error};
use livelock::protocol::{opcode, AllNames, Mode, Request, Status, WAIT_FOREVER};

const X: Mode = Mode::Exclusive;

#[test]
fn all_names_come_at_once_with_their_tokens_in_request_order() {
    // Four loops: the names live on different shards.
    let server = TestServer::start(4);
    let (a, b, watch) = (server.client(), server.client(), server.client());
    let held_b = a.acquire("b").unwrap();
    let b_client = Arc::new(b);
    let multi = {
        let b = b_client.clone();
        std::thread::spawn(move || {
            let names = [("c", X), ("a", Mode::Shared), ("b", X)];
            b.acquire_all(&names, None).unwrap().expect("waits forever")
        })
    };
    // B takes a (first in byte order), then queues for b behind A.
    wait_until("B queued for b", || queued(&watch, "b") == 1);
    assert_eq!(holders(&watch, "a"), [b_client.session_id()]);
    assert!(holders(&watch, "c").is_empty(), "c comes after b");
    let old = held_b.token();
    drop(held_b);
    let guards = bounded("B's grant", move || multi.join().unwrap());
    let names: Vec<&[u8]> = guards.iter().map(|g| g.name()).collect();
    assert_eq!(names, [&b"c"[..], b"a", b"b"]);
    assert!(guards[2].token() > old, "b's token goes up");
    for name in ["a", "b", "c"] {
        assert_eq!(holders(&watch, name), [b_client.session_id()]);
    }
    // Released with the guards.
    drop(guards);
    wait_until("all released", || {
        ["a", "b", "c"]
            .iter()
            .all(|n| holders(&watch, n).is_empty())
    });
}

#[test]
fn a_try_or_a_timeout_gives_back_what_it_took() {
    let server = TestServer::start(2);
    let (a, b, watch) = (server.client(), server.client(), server.client());
    let _c = a.acquire("c").unwrap();
    let names = [("a", X), ("b", X), ("c", X)];
    assert!(b
        .acquire_all(&names, Some(Duration::ZERO))
        .unwrap()
        .is_none());
    assert!(holders(&watch, "a").is_empty() && holders(&watch, "b").is_empty());
    let timed = b
        .acquire_all(&names, Some(Duration::from_millis(100)))
        .unwrap();
    assert!(timed.is_none());
    assert!(holders(&watch, "a").is_empty() && holders(&watch, "b").is_empty());
    // The names are free for others at once.
    let _a = watch.try_acquire("a").unwrap().expect("a is free");
    // Refused outright: a name twice, or one the session holds.
    match b.acquire_all(&[("x", X), ("x", X)], None) {
        Err(Error::Status(Status::BadBody, _)) => {}
        other => panic!("expected BadBody, got {:?}", other.map(|g| g.is_some())),
    }
    match a.acquire_all(&[("c", X), ("d", X)], None) {
        Err(Error::Status(Status::AlreadyHeld, _)) => {}
        other => panic!("expected AlreadyHeld, got {:?}", other.map(|g| g.is_some())),
    }
    assert!(holders(&watch, "d").is_empty());
}

#[test]
fn a_killed_session_frees_a_half_taken_set() {
    let server = TestServer::start(2);
    let (a, watch) = (server.client(), server.client());
    let b = Arc::new(server.client());
    let _y = a.acquire("y").unwrap();
    let waiter = {
        let b = b.clone();
        std::thread::spawn(move || {
            b.acquire_all(&[("x", X), ("y", X)], None)
                .map(|g| g.is_some())
        })
    };
    wait_until("B queued for y", || queued(&watch, "y") == 1);
    assert_eq!(holders(&watch, "x"), [b.session_id()]);
    watch.kill_session(b.session_id()).unwrap();
    wait_until("x freed", || holders(&watch, "x").is_empty());
    assert_eq!(queued(&watch, "y"), 0);
    assert!(bounded("B's end", move || waiter.join().unwrap()).is_err());
}

#[test]
fn a_deadlock_through_a_multi_lock_is_broken() {
    let server = TestServer::start(2);
    let (a, watch) = (Arc::new(server.client()), server.client());
    let b = Arc::new(server.client());
    let _x = a.acquire("x").unwrap();
    let multi = {
        let b = b.clone();
        std::thread::spawn(move || {
            b.acquire_all(&[("m", X), ("x", X)], None)
                .map(|g| g.map(|g| g.len()))
        })
    };
    wait_until("B holds m, waits for x", || queued(&watch, "x") == 1);
    std::thread::sleep(Duration::from_millis(2));
    // A waits for m: a cycle; A's wait is the youngest and fails.
    match a.acquire_timeout("m", WAIT_MAX) {
        Err(Error::Status(Status::Deadlock, cycle)) => assert!(cycle.contains("\"m\""), "{cycle}"),
        other => panic!("expected Deadlock, got {:?}", other.map(|g| g.is_some())),
    }
    drop(_x);
    let got = bounded("B's grant", move || multi.join().unwrap()).unwrap();
    assert_eq!(got, Some(2));
}

/// Clients take overlapping sets in every order, over and over: nobody
/// ever holds a name exclusively while another does (each holder stamps
/// the names it got and checks nobody else's stamp is there), and it all
/// ends (no deadlock between multi-locks).
#[test]
fn overlapping_sets_in_every_order_never_deadlock_nor_overlap() {
    let server = TestServer::start(3);
    let names = ["p", "q", "r", "s", "t"];
    let stamps = Stamps::new(&names);
    let workers: Vec<_> = (0..6u64)
        .map(|w| {
            let client = server.client();
            let stamps = stamps.clone();
            std::thread::spawn(move || {
                let mut grants = 0;
                for round in 0..40u64 {
                    // Three names, in an order that differs per worker and round.
                    let pick: Vec<usize> = (0..3)
                        .map(|k| ((w * 7 + round * 3 + k * (w + 2)) % 5) as usize)
                        .collect();
                    let mut set: Vec<usize> = Vec::new();
                    for i in pick {
                        if !set.contains(&i) {
                            set.push(i);
                        }
                    }
                    let request: Vec<(&str, Mode)> = set.iter().map(|&i| (names[i], X)).collect();
                    let guards = client.acquire_all(&request, None).unwrap().unwrap();
                    stamps.hold(w + 1, &set);
                    drop(guards);
                    grants += 1;
                }
                grants
            })
        })
        .collect();
    let total: u64 = bounded("every worker's rounds", move || {
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(total, 6 * 40);
}

#[test]
fn a_multi_lock_in_flight_survives_a_crash_of_a_log_server() {
    let dir = ScratchDir::new("multi-crash");
    let addr = free_addr();
    let data = data_dir(&dir);
    let start = || start_server_with("log server", &dir, &data, addr, "log", &[]);
    let mut server = start();
    let options = graceful();
    let holder = Client::connect(addr, &options).unwrap();
    let (holder_id, holder_secret) = (holder.session_id(), holder.secret());
    holder.acquire("b").unwrap().forget();
    // The multi-lock's session: a raw connection, so that the request in
    // flight is answered on the resumed one.
    let (mut raw, id, secret) = RawConn::hello(addr, 60_000);
    let mut names = Vec::new();
    AllNames::encode(&[(Mode::Exclusive, b"a"), (Mode::Shared, b"b")], &mut names);
    let request = Request::AcquireAll {
        names: AllNames::parse(2, &names).unwrap(),
        wait_ms: WAIT_FOREVER,
        notify_queued: true,
    };
    raw.send(5, &request);
    let interim = raw.recv();
    assert_eq!((interim.request_id, interim.status), (5, Status::Queued));
    let watch = Client::connect(addr, &options).unwrap();
    wait_until("a taken, b waited for", || holders(&watch, "a") == [id]);
    drop(watch);

    server.kill();
    drop((holder, raw));
    let _server = start();

    let (mut raw, _) = RawConn::resume(addr, id, secret);
    let watch = Client::connect(addr, &options).unwrap();
    // Started over: a taken again, waiting for b behind nobody.
    wait_until("a taken again", || holders(&watch, "a") == [id]);
    assert_eq!(queued(&watch, "b"), 1);
    // The resumed session lists nothing: a is not its to hold yet.
    let listing = raw.recv();
    assert_eq!(listing.opcode, opcode::HELD_END, "{listing:?}");
    let holder = Client::resume(addr, holder_id, holder_secret, &options).unwrap();
    holder.release("b").unwrap();
    let reply = raw.recv();
    assert_eq!(
        (reply.opcode, reply.request_id, reply.status),
        (opcode::ACQUIRE_ALL, 5, Status::Ok),
        "{reply:?}"
    );
    let tokens = livelock::protocol::parse_tokens_body(&reply.body, 2).unwrap();
    assert!(tokens.iter().all(|&t| t > 0));
    assert_eq!(holders(&watch, "b"), [id]);
    let seen_a = watch.inspect("a").unwrap().unwrap();
    assert_eq!(seen_a.holders[0].token, tokens[0]);
}

#[test]
fn run_all_holds_every_name_and_kill_9_frees_them() {
    let server = TestServer::start(3);
    let dir = ScratchDir::new("run-all");
    let fence_file = dir.join("fence");
    let blocker = server.client();
    let b = blocker.acquire("b").unwrap();
    let script = format!(
        "printf '%s\\n' \"$LIVELOCK_FENCE\" > {}; exec sleep 60",
        fence_file.display()
    );
    let mut run = livelock_bin();
    run.args(["run", "--server"])
        .arg(server.addr.to_string())
        .args(["--all", "c,a,b", "--", "sh", "-c", &script]);
    let mut child = ChildGuard::spawn("run --all", &mut run, &dir);
    let watch = server.client();
    // It waits for b, holding a (taken first), and COMMAND has not started.
    wait_until("the run waits for b", || queued(&watch, "b") == 1);
    assert!(!fence_file.exists(), "COMMAND ran without every lock");
    drop(b);
    let fence = child.wait_for("LIVELOCK_FENCE", |_| {
        let text = std::fs::read_to_string(&fence_file).ok()?;
        text.ends_with('\n').then_some(text)
    });
    let tokens: Vec<u64> = fence
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    let held: Vec<u64> = ["c", "a", "b"]
        .iter()
        .map(|n| watch.inspect(n).unwrap().expect("held").holders[0].token)
        .collect();
    assert_eq!(tokens, held, "tokens in --all's order");
    child.kill();
    wait_until("every name freed", || {
        ["a", "b", "c"]
            .iter()
            .all(|n| holders(&watch, n).is_empty())
    });

    // Usage errors, said before connecting.
    for (args, says) in [
        (&["--all", "x,x"][..], "named twice"),
        (&["--all", "x", "--permits", "2"][..], "cannot be used with"),
    ] {
        let out = livelock_bin()
            .arg("run")
            .args(args)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// The request for `names` (all exclusive), waiting forever, with QUEUED.
fn all_of<'a>(names: &[&str], buf: &'a mut Vec<u8>) -> Request<'a> {
    let list: Vec<(Mode, &[u8])> = names.iter().map(|n| (X, n.as_bytes())).collect();
    buf.clear();
    AllNames::encode(&list, buf);
    Request::AcquireAll {
        names: AllNames::parse(names.len() as u16, buf).unwrap(),
        wait_ms: WAIT_FOREVER,
        notify_queued: true,
    }
}

/// While a multi-lock waits, its parts are not the client's: a RELEASE
/// or EXTEND of one is NotHeld, a signal raised on one is not pushed (the
/// request goes on, and its tokens are
/// good); a CANCEL ends it and gives the parts back; a part taken away by
/// an operator fails it Cancelled at once, and the client hears no
/// LOCK_LOST.
#[test]
fn the_parts_of_a_waiting_multi_lock_are_not_the_clients() {
    let server = TestServer::start(2);
    let (a, watch) = (server.client(), server.client());
    let (mut raw, id, _) = RawConn::hello(server.addr, 0);
    let mut buf = Vec::new();
    // 1: a RELEASE of a part is refused; the request completes.
    let z = a.acquire("z").unwrap();
    raw.send(7, &all_of(&["y", "z"], &mut buf));
    assert_eq!(raw.recv().status, Status::Queued);
    assert_eq!(holders(&watch, "y"), [id]);
    let release = Request::Release {
        name: b"y",
        token: 0,
    };
    assert_eq!(raw.call(8, &release).status, Status::NotHeld);
    let extend = Request::Extend {
        name: b"y",
        lease_ms: 10,
        token: 0,
    };
    assert_eq!(raw.call(9, &extend).status, Status::NotHeld);
    // A signal raised on the part is not pushed: not the client's.
    watch.signal("y", "hup").unwrap();
    raw.expect_silence(Duration::from_millis(50));
    drop(z);
    let granted = raw.recv();
    assert_eq!((granted.request_id, granted.status), (7, Status::Ok));
    let tokens = livelock::protocol::parse_tokens_body(&granted.body, 2).unwrap();
    assert_eq!(
        watch.inspect("y").unwrap().unwrap().holders[0].token,
        tokens[0]
    );
    // Now they are: released by name.
    assert_eq!(raw.call(10, &release).status, Status::Ok);
    assert_eq!(
        raw.call(
            11,
            &Request::Release {
                name: b"z",
                token: 0
            }
        )
        .status,
        Status::Ok
    );

    // 2: a CANCEL ends it, the part taken is given back.
    let z = a.acquire("z").unwrap();
    raw.send(12, &all_of(&["y", "z"], &mut buf));
    assert_eq!(raw.recv().status, Status::Queued);
    raw.send(13, &Request::Cancel { target: 12 });
    // Both answers, in either order.
    let mut answers: Vec<(u32, Status)> = (0..2)
        .map(|_| raw.recv())
        .map(|f| (f.request_id, f.status))
        .collect();
    answers.sort_unstable_by_key(|a| a.0);
    assert_eq!(answers, [(12, Status::Cancelled), (13, Status::Ok)]);
    assert!(holders(&watch, "y").is_empty());
    assert_eq!(queued(&watch, "z"), 0);

    // 3: an operator takes a part away: the request fails at once (it
    // does not wait for z first), silently.
    raw.send(14, &all_of(&["y", "z"], &mut buf));
    assert_eq!(raw.recv().status, Status::Queued);
    wait_until("y taken again", || holders(&watch, "y") == [id]);
    watch.force_release("y", 0).unwrap();
    let failed = raw.recv();
    assert_eq!(
        (failed.opcode, failed.request_id, failed.status),
        (opcode::ACQUIRE_ALL, 14, Status::Cancelled),
        "no LOCK_LOST before it: {failed:?}"
    );
    assert_eq!(queued(&watch, "z"), 0, "no longer waiting for z");
    drop(z);
    raw.expect_silence(Duration::from_millis(50));
}
