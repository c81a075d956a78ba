//! Measures how long a bystander waits while the server answers a slow
//! LIST: holds many locks (1,000,000 by default), then sends one LIST with
//! a 1 KiB pattern that matches none of them and, until its reply arrives,
//! times a bystander's acquire + release of another lock, back to back.
//! Prints the LIST's duration and the bystander's p50/p99/max, during the
//! LIST and (for comparison) just before it — the "LIST over 1,000,000
//! locks" figures of BENCHMARKS.md.
//!
//! Names are `<run of 'a'>-<connection>-<number>` and the pattern is `*`,
//! 1,022 'a's, `b`: the glob matcher tries every offset in the run of 'a's.
//!
//! ```sh
//! target/release/livelock server --no-dump &
//! cargo run --release --example list_stall -- --server 127.0.0.1:7873 \
//!     --locks 1000000 --connections 20 --run 16
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use livelock::client::{Client, ClientOptions};
use livelock::protocol::{self, DecodedReply, Mode, Request, Status};

struct Options {
    server: String,
    locks: usize,
    connections: usize,
    /// Length of the run of 'a's each name starts with.
    run: usize,
}

fn parse() -> Options {
    let mut options = Options {
        server: "127.0.0.1:7873".into(),
        locks: 1_000_000,
        connections: 20,
        run: 16,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => options.server = value,
            "--locks" => options.locks = value.parse().expect("count"),
            "--connections" => options.connections = value.parse().expect("count"),
            "--run" => options.run = value.parse().expect("length"),
            _ => panic!("unknown flag {flag}"),
        }
    }
    options
}

/// Reads frames until `count` replies have arrived, the last one kept;
/// every one must be OK.
fn read_replies(stream: &mut TcpStream, buf: &mut Vec<u8>, mut count: usize) -> Vec<u8> {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let DecodedReply::Frame { consumed, reply } =
            protocol::decode_reply(buf).expect("a well-formed reply")
        {
            assert_eq!(reply.status, Status::Ok, "refused: {:?}", reply.status);
            let body = reply.body.to_vec();
            buf.drain(..consumed);
            count -= 1;
            if count == 0 {
                return body;
            }
        }
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A raw connection with a session.
fn hello(server: &str) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(server).expect("connect");
    stream.set_nodelay(true).unwrap();
    let mut frame = Vec::new();
    let hello = Request::Hello {
        grace_ms: 0,
        password: b"",
        client_name: b"list_stall",
    };
    protocol::encode_request(&mut frame, 1, &hello);
    stream.write_all(&frame).unwrap();
    let mut buf = Vec::new();
    read_replies(&mut stream, &mut buf, 1);
    (stream, buf)
}

/// Takes `count` locks on one connection, pipelined 512 at a time.
fn fill(server: &str, c: usize, count: usize, run: &str) -> TcpStream {
    let (mut stream, mut buf) = hello(server);
    let mut frame = Vec::new();
    let mut sent = 0;
    while sent < count {
        frame.clear();
        let n = 512.min(count - sent);
        for i in sent..sent + n {
            let name = format!("{run}-{c}-{i:08}");
            let acquire = Request::Acquire {
                name: name.as_bytes(),
                mode: Mode::Exclusive,
                weight: 1,
                capacity: 0,
                wait_ms: 0,
                lease_ms: 0,
                notify_queued: false,
            };
            protocol::encode_request(&mut frame, 2 + i as u32, &acquire);
        }
        stream.write_all(&frame).unwrap();
        read_replies(&mut stream, &mut buf, n);
        sent += n;
    }
    stream
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |p: usize| samples[(samples.len() - 1) * p / 100];
    format!(
        "{} samples, p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        samples.len(),
        at(50),
        at(99),
        samples[samples.len() - 1]
    )
}

fn main() {
    let options = parse();
    let run = "a".repeat(options.run);
    let per = options.locks / options.connections;
    let started = Instant::now();
    let fillers: Vec<_> = (0..options.connections)
        .map(|c| {
            let (server, run) = (options.server.clone(), run.clone());
            thread::spawn(move || fill(&server, c, per, &run))
        })
        .collect();
    let holders: Vec<TcpStream> = fillers.into_iter().map(|t| t.join().unwrap()).collect();
    let total = per * options.connections;
    println!(
        "holding {total} locks (names of {} bytes) on {} connections, taken in {:.2?}",
        options.run + 12,
        options.connections,
        started.elapsed()
    );

    let bystander =
        Client::connect(options.server.as_str(), &ClientOptions::default()).expect("bystander");
    let mut baseline = Vec::new();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let t = Instant::now();
        bystander.acquire("bystander").unwrap().release().unwrap();
        baseline.push(t.elapsed());
    }

    let pattern = format!("*{}b", "a".repeat(1022));
    let (mut asker, mut buf) = hello(&options.server);
    let mut frame = Vec::new();
    let list = Request::List {
        pattern: pattern.as_bytes(),
        limit: 10_000,
    };
    protocol::encode_request(&mut frame, 2, &list);
    let list_started = Instant::now();
    asker.write_all(&frame).unwrap();
    let waiter = thread::spawn(move || {
        let body = read_replies(&mut asker, &mut buf, 1);
        (body, list_started.elapsed())
    });
    let mut during = Vec::new();
    while !waiter.is_finished() {
        let t = Instant::now();
        bystander.acquire("bystander").unwrap().release().unwrap();
        during.push(t.elapsed());
    }
    let (body, list_elapsed) = waiter.join().unwrap();
    let records = protocol::parse_list_body(&body)
        .expect("a LIST body")
        .records;
    assert!(records.is_empty(), "the pattern matches nothing");
    println!("LIST (1 KiB pattern, no match) over {total} locks took {list_elapsed:.2?}");
    println!(
        "bystander acquire+release during the LIST: {}",
        summary(&mut during)
    );
    println!(
        "bystander acquire+release before the LIST: {}",
        summary(&mut baseline)
    );
    drop(holders);
}
