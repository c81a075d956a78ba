//! Resource pools ("K of these N", ACQUIRE_POOL) over real sockets: free
//! candidates are granted, distinct, with their tokens; a request that
//! cannot be served waits FIFO in the pool's queue and gets what the first
//! holder gives back; filters choose among tagged candidates, and one that
//! leaves too few is refused `OverCapacity`; several requirements and plain
//! names come all at once or not at all; many clients drawing from
//! overlapping pools never share a resource nor deadlock; the session's end
//! (kill) frees a half-served request; `livelock run --pool` passes the
//! resources to COMMAND and a kill -9 of it frees them; across a crash of a
//! `--durability log` server a pool request in flight starts over and is
//! answered on the resumed session.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    bounded, data_dir, free_addr, graceful, holders, livelock_bin, queued, start_server_with,
    wait_until, ChildGuard, RawConn, ScratchDir, Stamps, TestServer,
};
use livelock::client::{Client, Error, Requirement};
use livelock::pool::{parse_grant, PoolSpec};
use livelock::protocol::{opcode, Request, Status, WAIT_FOREVER};

fn names_of(grant: &livelock::client::PoolGrant, r: usize) -> Vec<String> {
    grant
        .names(r)
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

#[test]
fn k_of_n_grants_free_candidates_and_waits_fifo_in_the_pool() {
    let server = TestServer::start(4);
    let (a, b, watch) = (server.client(), server.client(), server.client());
    let c = Arc::new(server.client());
    let pool = || [Requirement::of(2, ["d", "b", "c", "a"])];
    // A takes the first two free in byte order; B the other two.
    let first = a.acquire_pool(&pool(), None).unwrap().expect("free");
    assert_eq!(names_of(&first, 0), ["b", "a"], "candidate order, as sent");
    let second = b.acquire_pool(&pool(), None).unwrap().expect("free");
    assert_eq!(names_of(&second, 0), ["d", "c"]);
    for name in ["a", "b"] {
        assert_eq!(holders(&watch, name), [a.session_id()]);
    }
    // Nothing left: a try fails at once, holding nothing.
    assert!(c
        .acquire_pool(&pool(), Some(Duration::ZERO))
        .unwrap()
        .is_none());
    // C waits in the pool's queue (a semaphore of 4 permits, 2 each).
    let queue = first.queues()[0].name().to_vec();
    assert_eq!(queue, second.queues()[0].name());
    let waiter = {
        let c = c.clone();
        std::thread::spawn(move || {
            let grant = c.acquire_pool(&pool(), None).unwrap().expect("forever");
            let names: Vec<Vec<u8>> = grant.names(0).iter().map(|n| n.to_vec()).collect();
            let tokens: Vec<u64> = grant.resources(0).iter().map(|g| g.token()).collect();
            grant.forget();
            (names, tokens)
        })
    };
    wait_until("C queued in the pool", || queued(&watch, &queue) == 1);
    let old: Vec<u64> = first.resources(0).iter().map(|g| g.token()).collect();
    first.release().unwrap();
    let (names, tokens) = bounded("C's grant", move || waiter.join().unwrap());
    assert_eq!(names, [b"b".to_vec(), b"a".to_vec()], "what A gave back");
    assert!(tokens.iter().zip(&old).all(|(new, old)| new > old));
    assert_eq!(holders(&watch, "a"), [c.session_id()]);
    // Releasing gives back the resources and the permits.
    second.release().unwrap();
    wait_until("d free", || holders(&watch, "d").is_empty());
}

#[test]
fn filters_choose_tagged_candidates_and_too_narrow_ones_are_refused() {
    let server = TestServer::start(2);
    let (a, watch) = (server.client(), server.client());
    let devices = [
        ("dev1", "model=T1000,site=lab1"),
        ("dev2", "model=T800,site=lab1"),
        ("dev3", "model=T1000,site=lab2"),
        ("dev4", "model=T1000,site=lab1"),
    ];
    let t1000 = Requirement::tagged(2, devices).filter("model=T1000,site=lab1");
    let grant = a
        .acquire_pool(&[t1000], Some(Duration::ZERO))
        .unwrap()
        .unwrap();
    assert_eq!(names_of(&grant, 0), ["dev1", "dev4"]);
    // Every matching candidate is needed: no queue.
    assert!(grant.queues().is_empty());
    assert!(holders(&watch, "dev2").is_empty());
    let narrow = Requirement::tagged(2, devices).filter("model=T800");
    match a.acquire_pool(&[narrow], None) {
        Err(Error::Status(Status::OverCapacity, text)) => {
            assert!(text.contains("requirement 0"), "{text}")
        }
        other => panic!(
            "expected OverCapacity, got {:?}",
            other.map(|g| g.is_some())
        ),
    }
    // Malformed requirements are refused before they are sent.
    let bad = Requirement::of(3, ["x", "y"]);
    assert!(matches!(
        a.acquire_pool(&[bad], None),
        Err(Error::Status(Status::BadBody, _))
    ));
}

#[test]
fn requirements_and_plain_names_come_all_at_once_or_not_at_all() {
    let server = TestServer::start(3);
    let (a, b, watch) = (server.client(), server.client(), server.client());
    let request = || {
        [
            Requirement::of(1, ["gpu1", "gpu2"]),
            Requirement::of(2, ["lic1", "lic2", "lic3"]),
            Requirement::name("rack"),
        ]
    };
    let rack = b.acquire("rack").unwrap();
    // The plain name is taken: a try takes nothing at all.
    assert!(a
        .acquire_pool(&request(), Some(Duration::ZERO))
        .unwrap()
        .is_none());
    for name in ["gpu1", "gpu2", "lic1", "lic2", "lic3"] {
        assert!(holders(&watch, name).is_empty(), "{name} given back");
    }
    drop(rack);
    let grant = a.acquire_pool(&request(), None).unwrap().unwrap();
    assert_eq!(names_of(&grant, 0), ["gpu1"]);
    assert_eq!(names_of(&grant, 1), ["lic1", "lic2"]);
    assert_eq!(names_of(&grant, 2), ["rack"]);
    assert_eq!(grant.queues().len(), 2);
}

#[test]
fn a_killed_session_frees_a_half_served_pool_request() {
    let server = TestServer::start(2);
    let (a, watch) = (server.client(), server.client());
    let b = Arc::new(server.client());
    let _z = a.acquire("z").unwrap();
    let waiter = {
        let b = b.clone();
        std::thread::spawn(move || {
            let request = [Requirement::of(1, ["x", "y"]), Requirement::name("z")];
            b.acquire_pool(&request, None).map(|g| g.is_some())
        })
    };
    wait_until("B queued for z", || queued(&watch, b"z") == 1);
    assert_eq!(holders(&watch, "x"), [b.session_id()]);
    watch.kill_session(b.session_id()).unwrap();
    wait_until("x freed", || holders(&watch, "x").is_empty());
    assert!(bounded("B's end", move || waiter.join().unwrap()).is_err());
}

/// Clients draw from two overlapping pools (and sometimes a plain name)
/// over and over: nobody ever holds a resource another holds (each stamps
/// what it got), and it all ends (no deadlock between pool requests).
#[test]
fn overlapping_pools_never_share_a_resource_nor_deadlock() {
    let server = TestServer::start(3);
    let names = ["r0", "r1", "r2", "r3", "r4", "r5", "solo"];
    let stamps = Stamps::new(&names);
    let workers: Vec<_> = (0..6u64)
        .map(|w| {
            let client = server.client();
            let stamps = stamps.clone();
            std::thread::spawn(move || {
                let mut grants = 0;
                for round in 0..30u64 {
                    let k = 1 + ((w + round) % 3) as u16;
                    let mut request = vec![match (w + round) % 2 {
                        0 => Requirement::of(k, &names[..5]),
                        _ => Requirement::of(k.min(2), &names[3..6]),
                    }];
                    if round % 4 == w % 4 {
                        request.push(Requirement::name("solo"));
                    }
                    let grant = client.acquire_pool(&request, None).unwrap().unwrap();
                    let got: Vec<usize> = (0..request.len())
                        .flat_map(|r| grant.names(r))
                        .map(|n| names.iter().position(|x| x.as_bytes() == n).unwrap())
                        .collect();
                    stamps.hold(w + 1, &got);
                    grant.release().unwrap();
                    grants += 1;
                }
                grants
            })
        })
        .collect();
    let total: u64 = bounded("every worker's rounds", move || {
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(total, 6 * 30);
}

#[test]
fn run_pool_passes_the_resources_and_kill_9_frees_them() {
    let server = TestServer::start(3);
    let dir = ScratchDir::new("run-pool");
    let env_file = dir.join("env");
    let blocker = server.client();
    let b = blocker.acquire("b").unwrap();
    let script = format!(
        "printf '%s|%s|%s|%s\\n' \"$LIVELOCK_RESOURCES\" \"$LIVELOCK_RESOURCES_1\" \
         \"$LIVELOCK_RESOURCES_2\" \"$LIVELOCK_FENCE\" > {}; exec sleep 60",
        env_file.display()
    );
    let mut run = livelock_bin();
    run.args(["run", "--server"])
        .arg(server.addr.to_string())
        .args(["--pool", "2 of a[t=1],b[t=1],c[t=2],d[t=1] where t=1"])
        .args(["--pool", "1 of e"])
        .args(["--", "sh", "-c", &script]);
    let mut child = ChildGuard::spawn("run --pool", &mut run, &dir);
    let text = child.wait_for("the environment", |_| {
        let text = std::fs::read_to_string(&env_file).ok()?;
        text.ends_with('\n').then_some(text)
    });
    let parts: Vec<&str> = text.trim_end().split('|').collect();
    assert_eq!(
        parts[..3],
        ["a d e", "a d", "e"],
        "b is taken, c filtered out"
    );
    let watch = server.client();
    let tokens: Vec<u64> = parts[3].split(' ').map(|t| t.parse().unwrap()).collect();
    let held: Vec<u64> = ["a", "d", "e"]
        .iter()
        .map(|n| watch.inspect(n).unwrap().expect("held").holders[0].token)
        .collect();
    assert_eq!(tokens, held, "LIVELOCK_FENCE in LIVELOCK_RESOURCES' order");
    drop(b);
    child.kill();
    wait_until("every resource freed", || {
        ["a", "d", "e"]
            .iter()
            .all(|n| holders(&watch, n).is_empty())
    });
    assert!(
        watch.list("pool:*", 10).unwrap().records.is_empty(),
        "permits freed"
    );

    // Usage errors, said before connecting.
    for (args, says) in [
        (&["--pool", "3 of x,y"][..], "K at most its candidates"),
        (&["--pool", "two of x"][..], "is not 'K of"),
        (
            &["--pool", "1 of x where k=1"][..],
            "leaves fewer candidates",
        ),
        (&["--pool", "1 of x[novalue]"][..], "KEY=VALUE"),
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

#[test]
fn a_pool_request_in_flight_survives_a_crash_of_a_log_server() {
    let dir = ScratchDir::new("pool-crash");
    let addr = free_addr();
    let data = data_dir(&dir);
    let start = || start_server_with("log server", &dir, &data, addr, "log", &[]);
    let mut server = start();
    let options = graceful();
    let holder = Client::connect(addr, &options).unwrap();
    let (holder_id, holder_secret) = (holder.session_id(), holder.secret());
    holder.acquire("p1").unwrap().forget();
    holder.acquire("p2").unwrap().forget();
    // The pool request's session: a raw connection, so that the request in
    // flight is answered on the resumed one.
    let (mut raw, id, secret) = RawConn::hello(addr, 60_000);
    let mut bytes = Vec::new();
    PoolSpec::encode(1, b"", &[(b"p1", b""), (b"p2", b"")], &mut bytes);
    let request = Request::AcquirePool {
        spec: PoolSpec::parse(1, &bytes).unwrap(),
        wait_ms: WAIT_FOREVER,
        notify_queued: true,
    };
    raw.send(5, &request);
    let interim = raw.recv();
    assert_eq!((interim.request_id, interim.status), (5, Status::Queued));
    let watch = Client::connect(addr, &options).unwrap();
    wait_until("p2 waited for", || queued(&watch, b"p2") == 1);
    drop(watch);

    server.kill();
    drop((holder, raw));
    let _server = start();

    let (mut raw, _) = RawConn::resume(addr, id, secret);
    let watch = Client::connect(addr, &options).unwrap();
    // Started over: its permits taken again, waiting for p2.
    wait_until("waiting for p2 again", || queued(&watch, b"p2") == 1);
    let listing = raw.recv();
    assert_eq!(
        listing.opcode,
        opcode::HELD_END,
        "nothing of it listed: {listing:?}"
    );
    let holder = Client::resume(addr, holder_id, holder_secret, &options).unwrap();
    holder.release("p2").unwrap();
    let reply = raw.recv();
    assert_eq!(
        (reply.opcode, reply.request_id, reply.status),
        (opcode::ACQUIRE_POOL, 5, Status::Ok),
        "{reply:?}"
    );
    let grant = parse_grant(&reply.body, &[1]).unwrap();
    assert_eq!(grant[0].taken.len(), 1);
    assert_eq!(grant[0].taken[0].0, 1, "p2");
    assert_eq!(holders(&watch, "p2"), [id]);
    let (queue, _) = grant[0].permits.clone().expect("a queue: 1 of 2");
    assert_eq!(holders(&watch, std::str::from_utf8(&queue).unwrap()), [id]);
}

/// A session that still holds a pool queue's permits (its resources given
/// back, its permits not yet) is refused the same pool, `AlreadyHeld`:
/// the permits stay its own, released when it says so.
#[test]
fn a_pool_whose_permits_the_session_holds_is_refused() {
    let server = TestServer::start(2);
    let (a, watch) = (server.client(), server.client());
    let pool = || [Requirement::of(1, ["u", "v", "w"])];
    let grant = a.acquire_pool(&pool(), None).unwrap().unwrap();
    let queue = String::from_utf8(grant.queues()[0].name().to_vec()).unwrap();
    let resource = String::from_utf8(grant.names(0)[0].to_vec()).unwrap();
    grant.forget();
    a.release(&resource).unwrap();
    match a.acquire_pool(&pool(), Some(Duration::ZERO)) {
        Err(Error::Status(Status::AlreadyHeld, _)) => {}
        other => panic!("expected AlreadyHeld, got {:?}", other.map(|g| g.is_some())),
    }
    assert_eq!(holders(&watch, &queue), [a.session_id()]);
    a.release(&queue).unwrap();
    assert!(holders(&watch, &queue).is_empty());
    assert!(a
        .acquire_pool(&pool(), Some(Duration::ZERO))
        .unwrap()
        .is_some());
}
