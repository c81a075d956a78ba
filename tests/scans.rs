//! FIND and LIST over a large shard, against a real server on loopback: a
//! scan runs in slices between the loop's other work, so a bystander's
//! acquire stays fast while a slow LIST is answered; and the replies to a
//! session's queries in flight always fit its write buffer, so four large
//! LISTs (or a huge FIND) do not get the asker disconnected.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use livelock::limits::{FIND_REPLY_BYTES_MAX, LIST_REPLY_BYTES_MAX, QUERIES_IN_FLIGHT_MAX};
use livelock::protocol::{self, opcode, Mode, Request, Status};

use common::*;

/// Takes `names` exclusively on one raw session, pipelined in batches the
/// in-flight limit allows; returns the connection (closing it frees them).
fn hold_all(addr: std::net::SocketAddr, names: &[Vec<u8>]) -> RawConn {
    let (mut conn, _, _) = RawConn::hello(addr, 0);
    for (b, batch) in names.chunks(1000).enumerate() {
        let mut frames = Vec::new();
        for (i, name) in batch.iter().enumerate() {
            let acquire = Request::Acquire {
                name,
                mode: Mode::Exclusive,
                weight: 1,
                capacity: 0,
                wait_ms: 0,
                lease_ms: 0,
                notify_queued: false,
            };
            protocol::encode_request(&mut frames, (10 + b * 1000 + i) as u32, &acquire);
        }
        conn.send_bytes(&frames);
        for _ in batch {
            let reply = conn.recv();
            assert_eq!(reply.status, Status::Ok, "{reply:?}");
        }
    }
    conn
}

/// Percentile `p` (0..=100) of sorted `samples`.
fn percentile(samples: &[Duration], p: usize) -> Duration {
    samples[(samples.len() - 1) * p / 100]
}

/// A bystander's acquire + release must stay fast while every loop scans a
/// large shard for a LIST whose 1 KiB pattern costs thousands of glob steps
/// per name and matches none. Before scans ran in slices, the loop stalled
/// for its whole scan (5 s or more in a debug build), and so did the
/// bystander. The 1,000,000-lock figure (release build) is in BENCHMARKS.md.
#[test]
fn a_bystander_is_served_while_a_slow_list_scans() {
    const LOCKS: usize = 100_000;
    const HOLDERS: usize = 4;
    const BOUND: Duration = Duration::from_secs(2);
    // One loop: it owns every lock and the bystander's connection, so
    // before slices it stalled for the whole LIST; a core stays free for
    // the test's own threads.
    let server = TestServer::start(1);
    let addr = server.addr;
    // 72 'a's then a unique number: against "*aaa…ab" every start offset
    // in the run of 'a's is tried, each matching up to the end of the run
    // (about 2,700 glob steps per name).
    let started = Instant::now();
    let fillers: Vec<_> = (0..HOLDERS)
        .map(|h| {
            thread::spawn(move || {
                let names: Vec<Vec<u8>> = (0..LOCKS / HOLDERS)
                    .map(|i| format!("{}-{h}-{i:07}", "a".repeat(72)).into_bytes())
                    .collect();
                hold_all(addr, &names)
            })
        })
        .collect();
    let holders: Vec<RawConn> = fillers.into_iter().map(|t| t.join().unwrap()).collect();
    println!("{LOCKS} locks taken in {:.2?}", started.elapsed());

    let pattern = format!("*{}b", "a".repeat(1022)).into_bytes();
    assert_eq!(pattern.len(), 1024);
    let (mut asker, _, _) = RawConn::hello(addr, 0);
    let bystander = server.client();
    // Warm up the bystander's path (session introduced to the shard).
    bystander.acquire("bystander").unwrap().release().unwrap();

    let list = Request::List {
        pattern: &pattern,
        limit: 10_000,
    };
    let list_started = Instant::now();
    asker.send(2, &list);
    let waiter = thread::spawn(move || {
        // Longer than WAIT_MAX: a loaded machine may take a while.
        let reply = asker.recv_within(6 * WAIT_MAX).expect("the LIST reply");
        (reply, list_started.elapsed())
    });
    let mut samples = Vec::new();
    while !waiter.is_finished() {
        let t = Instant::now();
        let guard = bystander.acquire("bystander").unwrap();
        guard.release().unwrap();
        samples.push(t.elapsed());
    }
    let (reply, list_elapsed) = waiter.join().unwrap();
    assert_eq!((reply.opcode, reply.status), (opcode::LIST, Status::Ok));
    let protocol::Listing {
        records, truncated, ..
    } = protocol::parse_list_body(&reply.body).expect("LIST body");
    assert!(
        records.is_empty() && !truncated,
        "the pattern matches nothing"
    );

    samples.sort();
    let max = *samples.last().expect("at least one sample");
    println!(
        "LIST over {LOCKS} locks (1 KiB pattern, no match) took {list_elapsed:.2?}; \
         bystander acquire+release during it: {} samples, p50 {:.2?}, p99 {:.2?}, max {max:.2?}",
        samples.len(),
        percentile(&samples, 50),
        percentile(&samples, 99),
    );
    assert!(
        max < BOUND,
        "a bystander waited {max:.2?} during a LIST of {list_elapsed:.2?}"
    );
    if cfg!(debug_assertions) {
        // The stall this test looks for is only visible if the LIST is
        // slower than the bound (in a debug build it takes 2.5× as long or more).
        assert!(
            list_elapsed > BOUND,
            "the LIST took only {list_elapsed:.2?}: too fast to show a stall"
        );
    }
    drop(holders);
}

/// A session with QUERIES_IN_FLIGHT_MAX LISTs in flight, each with a reply
/// of about LIST_REPLY_BYTES_MAX, that pipelines PINGs behind them and
/// reads nothing until all are sent, is owed all of it at once: it must fit
/// the write buffer (before, the replies went past WRITE_BUFFER_MAX and the
/// asker was disconnected).
#[test]
fn four_large_lists_at_once_do_not_disconnect_the_asker() {
    const PINGS: u32 = 200;
    let server = TestServer::start(1);
    // 1,100 records of about 1,050 bytes: each LIST reply is cut at 1 MiB.
    let names: Vec<Vec<u8>> = (0..1100)
        .map(|i| format!("{i:04}-{}", "n".repeat(995)).into_bytes())
        .collect();
    let _holder = hold_all(server.addr, &names);

    let (mut asker, _, _) = RawConn::hello(server.addr, 0);
    let list = Request::List {
        pattern: b"*",
        limit: 10_000,
    };
    let mut frames = Vec::new();
    for id in 0..QUERIES_IN_FLIGHT_MAX as u32 {
        protocol::encode_request(&mut frames, 100 + id, &list);
    }
    for id in 0..PINGS {
        protocol::encode_request(&mut frames, 1000 + id, &Request::Ping);
    }
    asker.send_bytes(&frames);
    // Read nothing until every reply is owed at once.
    thread::sleep(Duration::from_millis(500));
    let (mut lists, mut pings) = (0, 0);
    while lists < QUERIES_IN_FLIGHT_MAX || pings < PINGS {
        let reply = match asker.recv_within(WAIT_MAX) {
            Ok(reply) => reply,
            Err(why) => panic!("after {lists} LIST and {pings} PING replies: {why:?}"),
        };
        assert_eq!(reply.status, Status::Ok, "{reply:?}");
        if reply.opcode == opcode::PING {
            pings += 1;
            continue;
        }
        assert_eq!(reply.opcode, opcode::LIST);
        lists += 1;
        assert!(reply.body.len() <= LIST_REPLY_BYTES_MAX);
        assert!(
            reply.body.len() > LIST_REPLY_BYTES_MAX - 2000,
            "a large reply"
        );
        let protocol::Listing {
            records, truncated, ..
        } = protocol::parse_list_body(&reply.body).expect("LIST body");
        assert!(truncated, "1,100 records do not fit 1 MiB");
        assert_eq!(records[0].name, names[0]);
    }
    assert_eq!(asker.call(2, &Request::Ping).status, Status::Ok);
}

/// A LiveLock FIND whose matches would take more than the write buffer
/// holds is cut at FIND_REPLY_BYTES_MAX (as it is cut at FIND_RESULTS_MAX):
/// the client gets an answer and keeps its connection (before, the reply
/// went past WRITE_BUFFER_MAX and the connection was closed).
#[test]
fn a_huge_find_reply_is_cut_not_fatal() {
    use std::io::{Read, Write};
    let server = TestServer::start(2);
    // 4,300 names of 1,000 bytes: about 4.4 MB of FIND items.
    let names: Vec<Vec<u8>> = (0..4300)
        .map(|i| format!("{i:04}-{}", "f".repeat(995)).into_bytes())
        .collect();
    let _holder = hold_all(server.addr, &names);

    let mut c = std::net::TcpStream::connect(server.addr).unwrap();
    c.set_read_timeout(Some(WAIT_MAX)).unwrap();
    c.write_all(b"*1\r\n$4\r\nCONN\r\n").unwrap();
    c.write_all(b"*2\r\n$4\r\nFIND\r\n$1\r\n*\r\n").unwrap();
    c.write_all(b"*2\r\n$4\r\nFIND\r\n$4\r\nnone\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = std::time::Instant::now() + WAIT_MAX;
    while !buf.ends_with(b"\r\n*0\r\n") {
        assert!(std::time::Instant::now() < deadline, "no full answer");
        let n = c.read(&mut chunk).expect("read");
        assert!(n > 0, "closed after {} bytes", buf.len());
        buf.extend_from_slice(&chunk[..n]);
    }
    // +<client id>, then *N and N items, then *0 for the second FIND.
    let text = &buf[buf.iter().position(|&b| b == b'\n').unwrap() + 1..];
    let header_end = text.iter().position(|&b| b == b'\n').unwrap() + 1;
    let count: usize = std::str::from_utf8(&text[1..header_end - 2])
        .unwrap()
        .parse()
        .unwrap();
    let items = text.len() - header_end - b"*0\r\n".len();
    assert!(items <= FIND_REPLY_BYTES_MAX, "{items} bytes of items");
    assert!(count > 3900 && count < names.len(), "{count} items");
}
