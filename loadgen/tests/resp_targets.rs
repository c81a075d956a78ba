//! The RESP clients: livelock-resp:// against the real in-process server
//! and a small fake, redis:// against a fake and against a real
//! redis-server when one is installed (skipped otherwise).

mod common;
use common::*;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reads one command (a RESP array of bulk strings); None at end of stream.
fn read_command(reader: &mut BufReader<TcpStream>) -> Option<Vec<Vec<u8>>> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let argc: usize = line.trim_end().strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::with_capacity(argc);
    for _ in 0..argc {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let len: usize = line.trim_end().strip_prefix('$')?.parse().ok()?;
        let mut arg = vec![0; len + 2];
        std::io::Read::read_exact(reader, &mut arg).ok()?;
        arg.truncate(len);
        args.push(arg);
    }
    Some(args)
}

/// Serves every connection on its own thread with `answer(command) -> reply
/// bytes`, replies flushed once per batch of buffered commands. The accept
/// thread lives as long as the test process (the listener is never closed);
/// connection threads end when the client disconnects.
fn fake_server<F>(answer: F) -> String
where
    F: Fn(&[Vec<u8>]) -> Vec<u8> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut out = Vec::new();
                while let Some(command) = read_command(&mut reader) {
                    out.extend_from_slice(&answer(&command));
                    if reader.buffer().is_empty() {
                        if writer.write_all(&out).is_err() {
                            return;
                        }
                        out.clear();
                    }
                }
            });
        }
    });
    addr.to_string()
}

/// LiveLock as the brief describes it: CONN -> +<uuid>, AQ -> +1/+0,
/// RELEASE -> +1/+0, PING -> +PONG, PASS -> +OK. Locks are really tracked
/// (per connection id), so contention produces busy replies.
fn fake_livelock() -> String {
    let locks: Arc<Mutex<HashMap<Vec<u8>, u64>>> = Arc::default();
    let next_client = Arc::new(Mutex::new(0u64));
    // Each connection learns its id from CONN; the fake keys holds by the
    // uuid string it handed out, kept per thread.
    thread_local! {
        static ME: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    fake_server(move |cmd| {
        let verb = String::from_utf8_lossy(&cmd[0]).to_ascii_uppercase();
        match verb.as_str() {
            "PASS" => b"+OK\r\n".to_vec(),
            "CONN" => {
                let mut n = next_client.lock().unwrap();
                *n += 1;
                ME.with(|me| me.set(*n));
                format!("+00000000-0000-4000-8000-{:012x}\r\n", *n).into_bytes()
            }
            "AQ" => {
                let me = ME.with(|me| me.get());
                let mut locks = locks.lock().unwrap();
                if locks.contains_key(&cmd[1]) {
                    b"+0\r\n".to_vec()
                } else {
                    locks.insert(cmd[1].clone(), me);
                    b"+1\r\n".to_vec()
                }
            }
            "RELEASE" => {
                let me = ME.with(|me| me.get());
                let mut locks = locks.lock().unwrap();
                if locks.get(&cmd[1]) == Some(&me) {
                    locks.remove(&cmd[1]);
                    b"+1\r\n".to_vec()
                } else {
                    b"+0\r\n".to_vec()
                }
            }
            "PING" => b"+PONG\r\n".to_vec(),
            _ => b"-ERR unknown command\r\n".to_vec(),
        }
    })
}

/// Redis with just what the loadgen uses: SET NX PX (expiry ignored),
/// SCRIPT LOAD, EVALSHA of the compare-and-delete, PING, AUTH.
fn fake_redis() -> String {
    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
    let keys: Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>> = Arc::default();
    fake_server(move |cmd| {
        let verb = String::from_utf8_lossy(&cmd[0]).to_ascii_uppercase();
        match verb.as_str() {
            "AUTH" => b"+OK\r\n".to_vec(),
            "SCRIPT" => format!("${}\r\n{SHA}\r\n", SHA.len()).into_bytes(),
            "SET" => {
                assert_eq!(cmd.len(), 6, "SET key value NX PX ms");
                assert_eq!(cmd[3], b"NX");
                assert_eq!(cmd[4], b"PX");
                let mut keys = keys.lock().unwrap();
                if keys.contains_key(&cmd[1]) {
                    b"$-1\r\n".to_vec()
                } else {
                    keys.insert(cmd[1].clone(), cmd[2].clone());
                    b"+OK\r\n".to_vec()
                }
            }
            "EVALSHA" => {
                if cmd[1] != SHA.as_bytes() {
                    return b"-NOSCRIPT No matching script\r\n".to_vec();
                }
                assert_eq!(cmd[2], b"1");
                let mut keys = keys.lock().unwrap();
                if keys.get(&cmd[3]) == Some(&cmd[4]) {
                    keys.remove(&cmd[3]);
                    b":1\r\n".to_vec()
                } else {
                    b":0\r\n".to_vec()
                }
            }
            "PING" => b"+PONG\r\n".to_vec(),
            _ => b"-ERR unknown command\r\n".to_vec(),
        }
    })
}

/// The real server speaks LiveLock's protocol on the same port.
#[test]
fn livelock_resp_against_the_real_server() {
    let server = TestServer::start();
    let url = format!("livelock-resp://{}", server.addr);
    let json = loadgen_json(&[&url, "--duration", "1", "-c", "4"]);
    assert_healthy(&json);
    let json = loadgen_json(&[
        &url,
        "--duration",
        "1",
        "-c",
        "4",
        "-P",
        "16",
        "--keys",
        "64",
    ]);
    assert_healthy(&json);
    let json = loadgen_json(&[
        &url,
        "--duration",
        "1",
        "-c",
        "8",
        "--keys",
        "2",
        "--mode",
        "wait",
        "--retry-us",
        "200",
        "--hold-us",
        "100",
    ]);
    assert_healthy(&json);
    assert!(num(&json, "retries") > 0.0, "{json}");
    let json = loadgen_json(&[&url, "--duration", "0.5", "-c", "2", "--op", "ping"]);
    assert_healthy(&json);
}

#[test]
fn livelock_resp_against_a_fake() {
    let addr = fake_livelock();
    let url = format!("livelock-resp://{addr}");
    let json = loadgen_json(&[&url, "--duration", "1", "-c", "4", "--password", "pw"]);
    assert_healthy(&json);
    assert_eq!(num(&json, "lost"), 0.0, "{json}");
    // Pipelined, in order, with contention on few keys.
    let json = loadgen_json(&[
        &url,
        "--duration",
        "1",
        "-c",
        "4",
        "-P",
        "8",
        "--keys",
        "16",
    ]);
    assert_healthy(&json);
    assert!(num(&json, "busy") > 0.0, "{json}");
    let json = loadgen_json(&[&url, "--duration", "0.5", "-c", "2", "--op", "ping"]);
    assert_healthy(&json);
}

#[test]
fn redis_against_a_fake() {
    let addr = fake_redis();
    let url = format!("redis://{addr}");
    let json = loadgen_json(&[&url, "--duration", "1", "-c", "4", "-P", "4", "--keys", "8"]);
    assert_healthy(&json);
    assert_eq!(num(&json, "lost"), 0.0, "{json}");
    // Waiting is a client-side retry loop.
    let json = loadgen_json(&[
        &url,
        "--duration",
        "1",
        "-c",
        "4",
        "--keys",
        "2",
        "--mode",
        "wait",
        "--retry-us",
        "200",
        "--hold-us",
        "100",
    ]);
    assert_healthy(&json);
    assert!(num(&json, "retries") > 0.0, "{json}");
    assert_eq!(num(&json, "busy"), 0.0, "{json}");
}

/// A broken server that grants every acquire: the generator must notice
/// two of its connections holding one lock, count it and exit 1.
#[test]
fn double_grants_are_violations() {
    let addr = fake_server(|cmd| match cmd[0].as_slice() {
        b"CONN" => b"+00000000-0000-4000-8000-000000000001\r\n".to_vec(),
        _ => b"+1\r\n".to_vec(),
    });
    let out = loadgen(&[
        &format!("livelock-resp://{addr}"),
        "--duration",
        "1",
        "-c",
        "4",
        "--keys",
        "1",
        "--hold-us",
        "2000",
        "--json",
        "-q",
    ]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(num(&out.stdout, "violations") > 0.0, "{}", out.stdout);
    assert!(out.stderr.contains("violation"), "{}", out.stderr);
}

#[test]
fn resp_handshake_error_is_reported() {
    let addr = fake_server(|_| b"-ERR nope\r\n".to_vec());
    let out = loadgen(&[&format!("redis://{addr}"), "--duration", "1", "-c", "1"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("ERR nope"), "{}", out.stderr);
}

/// A real redis-server on a free loopback port, killed on drop.
struct RealRedis {
    child: Child,
    addr: String,
}

impl RealRedis {
    /// None when redis-server is not installed.
    fn start() -> Option<RealRedis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let redis = RealRedis {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(&redis.addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut line = String::new();
                    if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("+PONG") {
                        return Some(redis);
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RealRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn redis_against_a_real_server() {
    let Some(redis) = RealRedis::start() else {
        eprintln!("redis-server not installed: skipping");
        return;
    };
    let url = format!("redis://{}", redis.addr);
    let json = loadgen_json(&[
        &url,
        "--duration",
        "1",
        "-c",
        "8",
        "-P",
        "4",
        "--keys",
        "64",
    ]);
    assert_healthy(&json);
    assert_eq!(num(&json, "lost"), 0.0, "{json}");
    let json = loadgen_json(&[
        &url,
        "--duration",
        "1",
        "-c",
        "8",
        "--keys",
        "4",
        "--mode",
        "wait",
        "--retry-us",
        "200",
        "--wait-ms",
        "500",
    ]);
    assert_healthy(&json);
    let json = loadgen_json(&[&url, "--duration", "0.5", "-c", "4", "--op", "ping"]);
    assert_healthy(&json);
}
