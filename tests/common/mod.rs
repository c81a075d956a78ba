//! Helpers shared by the integration tests: an in-process server on
//! 127.0.0.1:0 and bounded waits.
#![allow(dead_code)]

pub mod certs;
pub mod cluster;
pub mod server_sim;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use livelock::client::{Client, ClientOptions};
use livelock::config::ServerConfig;
use livelock::server::Server;

/// Every wait in the tests is bounded by this.
pub const WAIT_MAX: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start(threads: usize) -> TestServer {
        TestServer::start_with(threads, |_| {})
    }

    pub fn start_with(threads: usize, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
        config.threads = threads;
        tweak(&mut config);
        let server = Server::start(config).expect("server starts");
        let addr = server.local_addr();
        TestServer {
            server: Some(server),
            addr,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr, &ClientOptions::default()).expect("connect")
    }

    pub fn client_with(&self, options: &ClientOptions) -> Client {
        Client::connect(self.addr, options).expect("connect")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            let _ = server.join();
        }
    }
}

/// Polls `condition` until it holds or WAIT_MAX passes (then panics).
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < WAIT_MAX, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---- raw native-protocol connections (byte-level tests) -----------------

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use livelock::protocol::{self, DecodedReply, Request, Status, SECRET_LEN};

/// One server frame, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub opcode: u8,
    pub flags: u16,
    pub status: Status,
    pub request_id: u32,
    pub body: Vec<u8>,
}

/// Why `RawConn::recv_within` returned no frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoFrame {
    /// The server closed the connection (FIN or RST).
    Closed,
    /// Nothing arrived in time.
    TimedOut,
}

/// A plain TCP connection speaking the native protocol frame by frame, for
/// tests that need exact bytes (raw frames, bad input, pipelining).
pub struct RawConn {
    pub stream: TcpStream,
    /// Received bytes not yet decoded.
    buf: Vec<u8>,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        RawConn::from_stream(TcpStream::connect_timeout(&addr, WAIT_MAX).expect("raw connect"))
    }

    /// Wraps a stream the test connected itself (e.g. with small socket buffers).
    pub fn from_stream(stream: TcpStream) -> RawConn {
        stream.set_nodelay(true).unwrap();
        stream.set_write_timeout(Some(WAIT_MAX)).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and opens a session; returns the connection, session id and secret.
    pub fn hello(addr: SocketAddr, grace_ms: u32) -> (RawConn, u64, [u8; SECRET_LEN]) {
        let mut conn = RawConn::connect(addr);
        let hello = Request::Hello {
            grace_ms,
            password: b"",
            client_name: b"raw-test",
        };
        let reply = conn.call(1, &hello);
        assert_eq!(reply.status, Status::Ok, "HELLO: {reply:?}");
        let (id, secret, _) = protocol::parse_session_body(&reply.body).expect("session body");
        (conn, id, secret)
    }

    pub fn send(&mut self, request_id: u32, request: &Request<'_>) {
        let mut frame = Vec::new();
        protocol::encode_request(&mut frame, request_id, request);
        self.send_bytes(&frame);
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw write");
    }

    /// The next frame, or why there is none within `timeout`.
    pub fn recv_within(&mut self, timeout: Duration) -> Result<RawFrame, NoFrame> {
        let deadline = Instant::now() + timeout;
        loop {
            match protocol::decode_reply(&self.buf) {
                Ok(DecodedReply::Frame { consumed, reply }) => {
                    let frame = RawFrame {
                        opcode: reply.opcode,
                        flags: reply.flags,
                        status: reply.status,
                        request_id: reply.request_id,
                        body: reply.body.to_vec(),
                    };
                    self.buf.drain(..consumed);
                    return Ok(frame);
                }
                Ok(DecodedReply::Incomplete) => {}
                Err(e) => panic!("the server sent a broken frame: {e} ({:02x?})", self.buf),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NoFrame::TimedOut);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(NoFrame::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Err(NoFrame::Closed)
                }
                Err(e) => panic!("raw read: {e}"),
            }
        }
    }

    /// The next frame; panics if the connection closes or WAIT_MAX passes.
    pub fn recv(&mut self) -> RawFrame {
        match self.recv_within(WAIT_MAX) {
            Ok(frame) => frame,
            Err(why) => panic!("expected a frame, got {why:?}"),
        }
    }

    /// Connects and RESUMEs session `id` (request id 1): the connection and
    /// the reply, which must be Ok.
    pub fn resume(addr: SocketAddr, id: u64, secret: [u8; SECRET_LEN]) -> (RawConn, RawFrame) {
        let mut conn = RawConn::connect(addr);
        let resume = Request::Resume {
            session_id: id,
            secret,
            password: b"",
        };
        let reply = conn.call(1, &resume);
        assert_eq!(reply.status, Status::Ok, "RESUME: {reply:?}");
        (conn, reply)
    }

    /// Sends `request` and returns the next frame, which must answer it.
    pub fn call(&mut self, request_id: u32, request: &Request<'_>) -> RawFrame {
        self.send(request_id, request);
        let reply = self.recv();
        assert_eq!(
            reply.request_id, request_id,
            "reply to another request: {reply:?}"
        );
        assert_eq!(
            reply.opcode,
            request.opcode(),
            "reply with another opcode: {reply:?}"
        );
        reply
    }

    /// Reads until the server closes the connection (bounded by WAIT_MAX);
    /// returns the frames it sent before closing.
    pub fn expect_closed(&mut self) -> Vec<RawFrame> {
        let deadline = Instant::now() + WAIT_MAX;
        let mut frames = Vec::new();
        loop {
            match self.recv_within(deadline.saturating_duration_since(Instant::now())) {
                Ok(frame) => frames.push(frame),
                Err(NoFrame::Closed) => return frames,
                Err(NoFrame::TimedOut) => {
                    panic!("the server did not close the connection; it sent {frames:?}")
                }
            }
        }
    }

    /// Asserts that nothing arrives for `quiet`.
    pub fn expect_silence(&mut self, quiet: Duration) {
        match self.recv_within(quiet) {
            Err(NoFrame::TimedOut) => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }
}

/// Runs `f` on a thread and waits at most WAIT_MAX for its result.
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(WAIT_MAX) {
        Ok(value) => value,
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

// ---- child processes and scratch directories (CLI and C tests) ----------

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh directory under the system temp dir (no temp-file crate: pid,
/// counter and clock make the name unique), removed when dropped.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(label: &str) -> ScratchDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "livelock-{label}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create scratch dir");
        ScratchDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A spawned process whose stdout and stderr go to files (so reading them
/// never blocks on a grandchild holding a pipe open). Killed with SIGKILL and
/// reaped when dropped, on every path, panics included.
pub struct ChildGuard {
    child: Child,
    what: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl ChildGuard {
    /// Spawns `command` with output in `dir/<what>.stdout` and `.stderr`
    /// (`what` must be unique within `dir`). Stdin is as `command` says
    /// (inherited unless set: set it).
    pub fn spawn(what: &str, command: &mut Command, dir: &ScratchDir) -> ChildGuard {
        let stdout = dir.join(&format!("{what}.stdout"));
        let stderr = dir.join(&format!("{what}.stderr"));
        let child = command
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({command:?}): {e}"));
        ChildGuard {
            child,
            what: what.to_string(),
            stdout,
            stderr,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits (bounded by WAIT_MAX) until `found` gives something; fails
    /// early, showing its stderr, if the process exits first.
    pub fn wait_for<T>(&mut self, what: &str, mut found: impl FnMut(&Self) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = found(self) {
                return value;
            }
            if let Some(status) = self.try_wait() {
                panic!("exited ({status}) before {what}; stderr: {}", self.stderr());
            }
            assert!(
                start.elapsed() < WAIT_MAX,
                "no {what} within {WAIT_MAX:?}; stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits at most WAIT_MAX for it to exit (then panics; drop kills it).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                start.elapsed() < WAIT_MAX,
                "{} did not exit within {WAIT_MAX:?}; stderr: {}",
                self.what,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL now, and reap.
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("reap")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether no live process has this pid (gone, or a zombie nobody reaped yet).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
    }
}

/// The `livelock` binary, with every `LIVELOCK_*` variable of the test's
/// environment removed (so a developer's settings cannot leak in) and no
/// stdin.
pub fn livelock_bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_livelock"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LIVELOCK_") {
            command.env_remove(key);
        }
    }
    command.stdin(std::process::Stdio::null());
    command
}

// ---- real server processes ----------------------------------------------

/// `dir/data`, created here (the server creates a missing one too; this
/// way the tests fail for what they test on servers that did not).
pub fn data_dir(dir: &ScratchDir) -> PathBuf {
    let path = dir.join("data");
    std::fs::create_dir_all(&path).expect("create the data dir");
    path
}

/// A loopback address with a port nobody listened on a moment ago.
pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap()
}

/// `livelock server --listen ADDR --data-dir DATA --durability DURABILITY
/// EXTRA...` (and `--threads 2` unless EXTRA says; started, not waited for).
pub fn spawn_server_with(
    what: &str,
    dir: &ScratchDir,
    data_dir: &Path,
    addr: SocketAddr,
    durability: &str,
    extra: &[&str],
) -> ChildGuard {
    let mut command = livelock_bin();
    command
        .args(["server", "--listen", &addr.to_string(), "--data-dir"])
        .arg(data_dir)
        .args(["--durability", durability])
        .args(extra);
    if !extra.contains(&"--threads") {
        command.args(["--threads", "2"]);
    }
    ChildGuard::spawn(what, &mut command, dir)
}

/// Waits (bounded) until `server` says it listens on `addr`: it then has the
/// data directory and the port, so no predecessor serves there any more.
/// Fails early if it exits first.
pub fn wait_listening(server: &mut ChildGuard, addr: SocketAddr) {
    let line = format!("listening on {addr}");
    server.wait_for(&line, |s| s.stderr().contains(&line).then_some(()));
}

/// Spawns a server and waits until it listens.
pub fn start_server_with(
    what: &str,
    dir: &ScratchDir,
    data_dir: &Path,
    addr: SocketAddr,
    durability: &str,
    extra: &[&str],
) -> ChildGuard {
    let mut server = spawn_server_with(what, dir, data_dir, addr, durability, extra);
    wait_listening(&mut server, addr);
    server
}

pub fn signal(process: &ChildGuard, signal: libc::c_int) {
    // SAFETY: kill(2) on a child we have not reaped (ChildGuard reaps only
    // in wait/kill/drop), so the pid is still ours.
    assert_eq!(
        unsafe { libc::kill(process.id() as libc::pid_t, signal) },
        0,
        "kill {signal}"
    );
}

/// Waits (bounded) for a server told to stop and checks it stopped cleanly.
pub fn expect_clean_exit(server: &mut ChildGuard) {
    let status = server.wait_exit();
    assert!(
        status.success(),
        "the server's shutdown failed ({status}); stderr: {}",
        server.stderr()
    );
}

pub fn graceful() -> ClientOptions {
    ClientOptions {
        grace: Duration::from_secs(30),
        ..ClientOptions::default()
    }
}

// ---- deterministic randomness (simulations) -------------------------------

/// splitmix64: tiny, fast, and the same on every platform.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }
}

/// The sessions holding `name` now, as INSPECT says.
pub fn holders(client: &livelock::client::Client, name: &str) -> Vec<u64> {
    client
        .inspect(name)
        .unwrap()
        .map_or_else(Vec::new, |i| i.holders.iter().map(|h| h.session).collect())
}

/// How many wait for `name` now, as INSPECT says.
pub fn queued(client: &livelock::client::Client, name: impl AsRef<[u8]>) -> usize {
    client.inspect(name).unwrap().map_or(0, |i| i.queue.len())
}

/// Who holds each of a few exclusive names, as the holders stamp it
/// themselves: a check, from outside the server, that no two ever hold one
/// at once.
pub struct Stamps {
    names: Vec<&'static str>,
    holders: Vec<std::sync::atomic::AtomicU64>,
}

impl Stamps {
    pub fn new(names: &[&'static str]) -> std::sync::Arc<Stamps> {
        let holders = names.iter().map(|_| Default::default()).collect();
        std::sync::Arc::new(Stamps {
            names: names.to_vec(),
            holders,
        })
    }

    /// Holder `me` (not 0) got the names at `got` (indices): each is
    /// stamped, checked nobody else's stamp was there, and cleared.
    pub fn hold(&self, me: u64, got: &[usize]) {
        use std::sync::atomic::Ordering::SeqCst;
        for &i in got {
            let before = self.holders[i].swap(me, SeqCst);
            assert_eq!(before, 0, "{} held twice", self.names[i]);
        }
        std::thread::yield_now();
        for &i in got {
            assert_eq!(self.holders[i].swap(0, SeqCst), me);
        }
    }
}
