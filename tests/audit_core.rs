//! Audit of the core: lock table, dump, restore, protocol, RESP, glob and
//! metrics. Each test pins one bug found in review (it fails until fixed) or
//! covers an edge the other test files do not reach.

mod common;

use std::time::Duration;

use common::*;
use livelock::dump::{self, Dump, DumpHold, DumpSession};
use livelock::protocol::{self, DecodedReply, HolderRecord, Mode};

// ---- native LIST/INSPECT replies larger than FRAME_BODY_MAX -----------------

/// The server caps a LIST reply at LIST_REPLY_BYTES_MAX (1 MiB), but the
/// client-side decoder refuses any server frame whose body is over
/// FRAME_BODY_MAX (4096): a LIST of a few long names breaks the stream.
#[test]
fn decode_reply_accepts_a_list_reply_larger_than_frame_body_max() {
    let mut out = Vec::new();
    let start = protocol::begin_reply(&mut out, protocol::opcode::LIST, 9);
    let records = 5u32;
    out.extend_from_slice(&records.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&1_700_000_000_000u64.to_le_bytes()); // server_unix_ms
    for i in 0..records {
        let name = vec![b'a' + i as u8; 1000];
        let holder = HolderRecord {
            session: 1,
            token: u64::from(i) + 1,
            weight: 1,
            since_unix_ms: 0,
            client_name: b"c",
        };
        protocol::put_lock_record(&mut out, &name, (Mode::Exclusive, 0), 0, &[holder], &[]);
    }
    protocol::end_reply(&mut out, start);
    assert!(out.len() > 16 + livelock::limits::FRAME_BODY_MAX);
    match protocol::decode_reply(&out) {
        Ok(DecodedReply::Frame { consumed, reply }) => {
            assert_eq!(consumed, out.len());
            let protocol::Listing {
                records: list,
                truncated,
                ..
            } = protocol::parse_list_body(reply.body).expect("list body");
            assert_eq!(list.len(), 5);
            assert!(!truncated);
        }
        other => panic!("a LIST reply the server sends is refused: {other:?}"),
    }
}

/// End to end: five held locks with 1000-byte names, listed by the Rust client.
#[test]
fn client_lists_locks_whose_records_exceed_4096_bytes() {
    let server = TestServer::start(2);
    let holder = server.client();
    let mut guards = Vec::new();
    for i in 0..5u8 {
        let name = vec![b'a' + i; 1000];
        guards.push(holder.acquire(&name).expect("acquire"));
    }
    let lister = server.client();
    let livelock::client::Listing {
        records: list,
        truncated,
        ..
    } = lister.list(b"*", 100).expect("LIST of five long names");
    assert_eq!(list.len(), 5);
    assert!(!truncated);
}

/// INSPECT of one lock with many signals: the record alone is over 4096 bytes.
#[test]
fn client_inspects_a_lock_whose_record_exceeds_4096_bytes() {
    let server = TestServer::start(1);
    let holder = server.client();
    let _guard = holder.acquire(b"big").expect("acquire");
    for i in 0..8u8 {
        holder.signal(b"big", vec![b'0' + i; 1000]).expect("signal");
    }
    let record = holder
        .inspect(b"big")
        .expect("INSPECT of a lock with 8 KB of signals")
        .expect("held");
    assert_eq!(record.signals.len(), 8);
}

// ---- restoring a hostile dump -------------------------------------------

fn session(id: u64, client_id: Option<&[u8]>) -> DumpSession {
    DumpSession {
        id,
        secret: [1; 16],
        client_name: b"x".to_vec(),
        client_id: client_id.map(<[u8]>::to_vec),
        grace_ms: 1000,
        order: None,
        multis: Vec::new(),
    }
}

fn start_with_dump(dir: &ScratchDir, state: &Dump, threads: usize) -> TestServer {
    livelock::data_dir::write_atomic(&dir.join(dump::FILE_NAME), &dump::encode(state)).unwrap();
    let data_dir = dir.path().to_path_buf();
    TestServer::start_with(threads, move |config| {
        config.data_dir = data_dir;
        config.dump_load = true;
        config.dump_save = false;
        config.release_all_timeout = Duration::from_millis(60_000);
    })
}

/// A dump that `decode` accepts (a native session whose sequence number is
/// the largest a session id can carry) makes `Sessions::fresh_id` wrap to
/// small ids, which then collide with another restored session: the server
/// panics while starting ("session id reused").
#[test]
fn restoring_a_session_id_near_u64_max_does_not_reuse_ids() {
    let dir = ScratchDir::new("audit-dump-wrap");
    let state = Dump {
        created_unix_ms: 1,
        last_token: 0,
        sessions: vec![
            // Home 0, sequence 2^56 - 1.
            session(0xFFFF_FFFF_FFFF_FF00, None),
            // Home 0, sequence 1.
            session(0x100, None),
            // LiveLock sessions dumped by a two-loop server (home 1): with
            // one loop they get fresh ids at home 0.
            session(0x201, Some(b"c1")),
            session(0x301, Some(b"c2")),
        ],
        holds: vec![],
        waiters: vec![],
        signals: vec![],
        log: None,
    };
    dump::decode(&dump::encode(&state)).expect("the dump is valid");
    let result = std::panic::catch_unwind(|| start_with_dump(&dir, &state, 1));
    let server = result.expect("Server::start must not panic on a dump decode accepted");
    // And new sessions still work.
    server.client().ping().expect("ping");
}

// ---- fencing tokens across a restart with another loop count -------------

/// A hold whose grant time is u64::MAX (accepted by `dump::decode`, and even
/// part of its own round-trip sample) is restored as is; with metrics on, the
/// loop's first gauge update asserts `since != NO_HOLD` and the loop dies:
/// no connection is served any more.
#[test]
fn a_restored_hold_granted_at_u64_max_does_not_kill_the_loop() {
    let dir = ScratchDir::new("audit-dump-since");
    let state = Dump {
        created_unix_ms: 1,
        last_token: 5,
        sessions: vec![session(0x100, None)],
        holds: vec![DumpHold {
            name: b"held".to_vec(),
            session: 0x100,
            mode: Mode::Exclusive,
            weight: 1,
            capacity: 0,
            token: 5,
            since_unix_ms: u64::MAX,
            lease_left_ms: 0,
        }],
        waiters: vec![],
        signals: vec![],
        log: None,
    };
    livelock::data_dir::write_atomic(&dir.join(dump::FILE_NAME), &dump::encode(&state)).unwrap();
    let data_dir = dir.path().to_path_buf();
    let mut server = TestServer::start_with(1, move |config| {
        config.data_dir = data_dir;
        config.dump_load = true;
        config.dump_save = false;
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let mut conn = RawConn::connect(server.addr);
    conn.send(
        1,
        &protocol::Request::Hello {
            grace_ms: 0,
            password: b"",
            client_name: b"audit",
        },
    );
    let reply = conn.recv_within(Duration::from_secs(5));
    assert!(
        matches!(&reply, Ok(frame) if frame.status == protocol::Status::Ok),
        "HELLO not answered: {reply:?}"
    );
    let server = server.server.take().unwrap();
    server.shutdown();
    server.join().expect("no event loop panicked");
}

/// Tokens keep increasing per lock across a restart that changes the loop
/// count: the lock lands on another shard, whose own counter was lower.
#[test]
fn tokens_increase_across_a_restart_with_another_loop_count() {
    let dir = ScratchDir::new("audit-tokens");
    let data_dir = dir.path().to_path_buf();
    let start = |threads: usize| {
        let data_dir = data_dir.clone();
        TestServer::start_with(threads, move |config| {
            config.data_dir = data_dir;
            config.dump_load = true;
            config.dump_save = true;
            // A clock at the epoch: tokens seeded from it start near 0, so
            // only the dump's last token keeps them increasing.
            config.clock_start_unix_ms = Some(1);
        })
    };
    // Many names so that, with 3 loops, each shard's counter differs.
    let names: Vec<String> = (0..40).map(|i| format!("lock-{i}")).collect();
    let mut last = std::collections::HashMap::new();
    let first = start(3);
    {
        let client = first.client();
        for round in 0..3 {
            for (i, name) in names.iter().enumerate() {
                if (i + round) % 3 == 0 {
                    continue;
                }
                let guard = client.acquire(name).unwrap();
                last.insert(name.clone(), guard.token());
                guard.release().unwrap();
            }
        }
    }
    drop(first);
    let second = start(2);
    let client = second.client();
    for name in &names {
        let guard = client.acquire(name).unwrap();
        if let Some(&before) = last.get(name) {
            assert!(
                guard.token() > before,
                "{name}: {} after {before}",
                guard.token()
            );
        }
    }
}
