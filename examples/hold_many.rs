//! Holds many locks at once, over many connections, and reports what the
//! server's memory grew by per held lock — the "bytes per held lock" and
//! "10,000 connections each holding a lock" figures of BENCHMARKS.md.
//!
//! One thread, plain blocking sockets: each connection says HELLO, then
//! pipelines its acquires and reads their grants. The server's resident
//! memory is read from /proc before and after; the locks are then held for
//! `--hold-secs` while the server is asked (STATS) that every one is still
//! held, and released by closing the connections.
//!
//! ```sh
//! target/release/livelock server --no-dump &
//! cargo run --release --example hold_many -- --server 127.0.0.1:7873 \
//!     --pid $(pgrep -f 'livelock server') --connections 100 --locks-per-connection 10000
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use livelock::client::{Client, ClientOptions};
use livelock::protocol::{self, DecodedReply, Mode, Request, Status};

struct Options {
    server: String,
    pid: Option<u32>,
    connections: usize,
    locks_per_connection: usize,
    hold_secs: u64,
    /// The sessions' grace (a clean restart keeps only graceful sessions).
    grace_ms: u32,
    /// First letter of the lock names (another run's names differ).
    prefix: char,
}

fn parse() -> Options {
    let mut options = Options {
        server: "127.0.0.1:7873".into(),
        pid: None,
        connections: 100,
        locks_per_connection: 10_000,
        hold_secs: 5,
        grace_ms: 0,
        prefix: 'h',
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => options.server = value,
            "--pid" => options.pid = Some(value.parse().expect("pid")),
            "--connections" => options.connections = value.parse().expect("count"),
            "--locks-per-connection" => {
                options.locks_per_connection = value.parse().expect("count")
            }
            "--hold-secs" => options.hold_secs = value.parse::<u64>().expect("seconds").min(600),
            "--grace-ms" => options.grace_ms = value.parse().expect("ms"),
            "--prefix" => options.prefix = value.chars().next().expect("a letter"),
            _ => panic!("unknown flag {flag}"),
        }
    }
    options
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Reads frames until `count` final replies have arrived; every one must be OK.
fn read_replies(stream: &mut TcpStream, buf: &mut Vec<u8>, mut count: usize) {
    let mut chunk = vec![0u8; 64 * 1024];
    while count > 0 {
        while let DecodedReply::Frame { consumed, reply } =
            protocol::decode_reply(buf).expect("a well-formed reply")
        {
            let status = reply.status;
            assert_eq!(status, Status::Ok, "a lock was refused: {status:?}");
            buf.drain(..consumed);
            count -= 1;
            if count == 0 {
                return;
            }
        }
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn main() {
    let options = parse();
    let total = options.connections * options.locks_per_connection;
    let before = options.pid.map(rss_bytes);
    let started = Instant::now();
    let mut streams = Vec::with_capacity(options.connections);
    let mut frame = Vec::new();
    let mut buf = Vec::new();
    for c in 0..options.connections {
        let mut stream = TcpStream::connect(&options.server).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        frame.clear();
        let hello = Request::Hello {
            grace_ms: options.grace_ms,
            password: b"",
            client_name: b"hold_many",
        };
        protocol::encode_request(&mut frame, 1, &hello);
        stream.write_all(&frame).unwrap();
        buf.clear();
        read_replies(&mut stream, &mut buf, 1);
        // Pipeline in batches the server's in-flight limit allows.
        let batch = 512;
        let mut sent = 0;
        while sent < options.locks_per_connection {
            frame.clear();
            let n = batch.min(options.locks_per_connection - sent);
            for i in sent..sent + n {
                let name = format!("{}old:{:04}:{:08}", options.prefix, c % 10_000, i);
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
        streams.push(stream);
    }
    let elapsed = started.elapsed();
    println!(
        "holding {total} locks (names of 18 bytes) on {} connections, acquired in {:.2?}",
        options.connections, elapsed
    );
    if let (Some(pid), Some(before)) = (options.pid, before) {
        let after = rss_bytes(pid);
        let grown = after.saturating_sub(before);
        println!(
            "server RSS {:.1} MiB -> {:.1} MiB: {:.0} bytes per held lock (incl. the 18-byte name), {:.0} beyond the name",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            grown as f64 / total as f64,
            grown as f64 / total as f64 - 18.0
        );
    }
    let probe = Client::connect(options.server.as_str(), &ClientOptions::default()).expect("probe");
    let deadline = Instant::now() + Duration::from_secs(options.hold_secs);
    while Instant::now() < deadline {
        let stats = probe.stats().expect("stats");
        assert!(
            stats.locks >= total as u64,
            "holds lost: {} of {total} still held",
            stats.locks
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let stats = probe.stats().expect("stats");
    println!(
        "after {}s: {} locks still held, {} connections open",
        options.hold_secs, stats.locks, stats.connections
    );
    drop(streams);
}
