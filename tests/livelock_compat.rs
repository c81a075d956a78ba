//! The LiveLock protocol byte for byte, over raw TCP against an in-process
//! server: reply bytes of every verb in inline and RESP form, the PASS →
//! CONN → verbs state machine, errors that close the connection, pipelining
//! across shards, and LiveLock and native clients sharing one lock table.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{TestServer, WAIT_MAX};
use livelock::client::AcquireOptions;

const PONG: &[u8] = b"+PONG\r\n";
const ONE: &[u8] = b"+1\r\n";
const ZERO: &[u8] = b"+0\r\n";
const E_CONN: &[u8] = b"-1 CONN required first\r\n";
const E_ARGS: &[u8] = b"-2 Wrong number of arguments\r\n";
const E_HAS_ID: &[u8] = b"-3 Already has client id\r\n";
const E_UNKNOWN: &[u8] = b"-4 Unknown command\r\n";
const E_PASS: &[u8] = b"-5 Wrong or no password\r\n";
const E_RESP: &[u8] = b"-6 RESP protocol error\r\n";
const E_NO_KEY: &[u8] = b"-8 Key does not exists\r\n";

/// Runs `f` on a thread and waits at most WAIT_MAX for its result.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(WAIT_MAX) {
        Ok(value) => value,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// A command as a RESP array of bulk strings.
fn resp(parts: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A command as an inline line.
fn inline(parts: &[&str]) -> Vec<u8> {
    let mut out = parts.join(" ").into_bytes();
    out.extend_from_slice(b"\r\n");
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Inline,
    Resp,
}

impl Form {
    fn encode(self, parts: &[&str]) -> Vec<u8> {
        match self {
            Form::Inline => inline(parts),
            Form::Resp => resp(parts),
        }
    }
}

/// One decoded reply (RESP3 as server.py's `pack_resp` writes it).
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Double(f64),
    Blob(Vec<u8>),
    Array(Vec<Reply>),
    Map(Vec<(Reply, Reply)>),
}

/// A raw LiveLock connection.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect_timeout(&addr, WAIT_MAX).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream.set_write_timeout(Some(WAIT_MAX)).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and sends CONN (with `client_id` if given); returns the id.
    fn conn(addr: SocketAddr, client_id: Option<&str>) -> (Raw, String) {
        let mut raw = Raw::connect(addr);
        let id = raw.do_conn(Form::Resp, client_id);
        (raw, id)
    }

    fn do_conn(&mut self, form: Form, client_id: Option<&str>) -> String {
        let mut parts = vec!["CONN"];
        parts.extend(client_id);
        self.send(&form.encode(&parts));
        let line = self.line();
        assert!(line.starts_with(b"+"), "CONN reply {}", show(&line));
        let id = String::from_utf8(line[1..line.len() - 2].to_vec()).unwrap();
        if let Some(want) = client_id {
            assert_eq!(id, want);
        }
        id
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads more bytes into `buf`; false at EOF (or reset).
    fn fill(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out; have {:?}", show(&self.buf));
        self.stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
            Err(e) if e.kind() == ErrorKind::Interrupted => true,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                false
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    fn need(&mut self, n: usize, deadline: Instant) {
        while self.buf.len() < n {
            assert!(
                self.fill(deadline),
                "closed while waiting for {n} bytes; have {:?}",
                show(&self.buf)
            );
        }
    }

    /// The next bytes must be exactly `want`.
    fn expect(&mut self, want: &[u8]) {
        self.need(want.len(), Instant::now() + WAIT_MAX);
        let got: Vec<u8> = self.buf.drain(..want.len()).collect();
        assert_eq!(show(&got), show(want));
    }

    /// Sends `command` and expects exactly `want` back.
    fn call(&mut self, command: &[u8], want: &[u8]) {
        self.send(command);
        self.expect(want);
    }

    /// The next line, CRLF included.
    fn line(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return self.buf.drain(..p + 2).collect();
            }
            assert!(
                self.fill(deadline),
                "closed mid-line; have {:?}",
                show(&self.buf)
            );
        }
    }

    /// The next reply, decoded, and its exact bytes.
    fn reply(&mut self) -> (Reply, Vec<u8>) {
        let mut raw = Vec::new();
        let reply = self.reply_into(&mut raw);
        (reply, raw)
    }

    fn reply_into(&mut self, raw: &mut Vec<u8>) -> Reply {
        let line = self.line();
        raw.extend_from_slice(&line);
        let body = &line[1..line.len() - 2];
        let text = std::str::from_utf8(body).expect("utf-8 header");
        let count = || text.parse::<usize>().expect("a count");
        match line[0] {
            b'+' => Reply::Simple(body.to_vec()),
            b'-' => Reply::Error(body.to_vec()),
            b':' => Reply::Int(text.parse().expect("an integer")),
            b',' => Reply::Double(text.parse().expect("a double")),
            b'$' => {
                let len = count();
                self.need(len + 2, Instant::now() + WAIT_MAX);
                let data: Vec<u8> = self.buf.drain(..len + 2).collect();
                assert_eq!(&data[len..], b"\r\n", "bulk not followed by CRLF");
                raw.extend_from_slice(&data);
                Reply::Blob(data[..len].to_vec())
            }
            b'*' => Reply::Array((0..count()).map(|_| self.reply_into(raw)).collect()),
            b'%' => Reply::Map(
                (0..count())
                    .map(|_| (self.reply_into(raw), self.reply_into(raw)))
                    .collect(),
            ),
            other => panic!(
                "unexpected reply type {:?} in {}",
                other as char,
                show(&line)
            ),
        }
    }

    /// The server closes the connection without sending anything more.
    fn expect_closed(&mut self) {
        let deadline = Instant::now() + WAIT_MAX;
        while self.fill(deadline) {}
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before close: {}",
            show(&self.buf)
        );
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn assert_uuid4(id: &str) {
    let groups: Vec<&str> = id.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    assert_eq!(lens, [8, 4, 4, 4, 12], "not a uuid: {id}");
    assert!(
        id.chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "not lowercase hex: {id}"
    );
    assert!(groups[2].starts_with('4'), "not version 4: {id}");
    assert!(
        matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
        "not the RFC 4122 variant: {id}"
    );
}

/// Every verb's reply bytes, in one form. `p` prefixes lock names so that
/// both forms can share a server.
fn verb_script(addr: SocketAddr, form: Form, p: &str) {
    let lock = format!("{p}lock");
    let free = format!("{p}free");
    let lock = lock.as_str();
    let free = free.as_str();
    let mut c = Raw::connect(addr);
    let call = |c: &mut Raw, parts: &[&str], want: &[u8]| {
        c.send(&form.encode(parts));
        let mut got = Vec::new();
        c.need(want.len(), Instant::now() + WAIT_MAX);
        got.extend(c.buf.drain(..want.len()));
        assert_eq!(show(&got), show(want), "{form:?} {parts:?}");
    };

    // Before CONN, everything else is refused (even PASS when no password is set).
    for parts in [
        &["PING"][..],
        &["AQ", lock],
        &["STATS"],
        &["FIND", "*"],
        &["CONNINFO", "x"],
        &["PASS", "pw"],
        &["NOSUCHVERB"],
        &["SHUTDOWN"],
    ] {
        call(&mut c, parts, E_CONN);
    }
    let id = c.do_conn(form, None);
    assert_uuid4(&id);
    let script: &[(&[&str], &[u8])] = &[
        (&["CONN"], E_HAS_ID),
        (&["CONN", "another-id"], E_HAS_ID),
        (&["PING"], PONG),
        (&["PING", "extra", "args"], PONG),
        (&["CONNINFO", "host:1234"], ONE),
        (&["CONNINFO"], E_ARGS),
        (&["CONNINFO", "a", "b"], E_ARGS),
        (&["AQ", lock], ONE),
        (&["AQ", lock], ZERO),
        (&["AQR", lock], ONE),
        (&["LOCKED", lock], ONE),
        (&["LOCKED", free], ZERO),
        (&["AQ"], E_ARGS),
        (&["AQ", lock, "extra"], E_ARGS),
        (&["AQR"], E_ARGS),
        (&["RELEASE"], E_ARGS),
        (&["LOCKED"], E_ARGS),
        (&["SIGSET", lock, "CANCEL"], ONE),
        (&["SIGEXISTS", lock, "cancel"], ONE),
        (&["SIGEXISTS", lock, "other"], ZERO),
        (&["SIGDEL", lock, "Cancel"], ONE),
        (&["SIGDEL", lock, "cancel"], ZERO),
        (&["SIGEXISTS", lock, "CANCEL"], ZERO),
        (&["SIGSET", lock], E_ARGS),
        (&["SIGEXISTS", lock, "a", "b"], E_ARGS),
        (&["SIGDEL"], E_ARGS),
        (&["SIGSET", free, "X"], E_NO_KEY),
        (&["SIGEXISTS", free, "X"], E_NO_KEY),
        (&["SIGDEL", free, "X"], E_NO_KEY),
        (&["RELEASE", free], ZERO),
        (&["RELEASE", lock], ONE),
        (&["RELEASE", lock], ZERO),
        (&["LOCKED", lock], ZERO),
        (&["SIGSET", lock, "X"], E_NO_KEY),
        (&["FIND", "no-such-lock-*"], b"*0\r\n"),
        (&["FIND"], E_ARGS),
        (&["FIND", "a", "b"], E_ARGS),
        (&["STATS", "x"], E_ARGS),
        (&["NOSUCHVERB"], E_UNKNOWN),
        (&["DUMP"], E_UNKNOWN),
        (&["PASS", "pw"], E_UNKNOWN),
        (&["SHUTDOWN"], E_UNKNOWN),
        // Verbs are case-insensitive.
        (&["ping"], PONG),
        (&["pInG"], PONG),
        (&["aq", lock], ONE),
        (&["Aqr", lock], ONE),
        (&["locked", lock], ONE),
        (&["SigSet", lock, "x"], ONE),
        (&["sigexists", lock, "X"], ONE),
        (&["sigDEL", lock, "x"], ONE),
        (&["conninfo", "y"], ONE),
        (&["conn"], E_HAS_ID),
        (&["Release", lock], ONE),
        (&["find", "no-such-lock-*"], b"*0\r\n"),
        (&["shutdown"], E_UNKNOWN),
    ];
    for (parts, want) in script {
        call(&mut c, parts, want);
    }
    // Nothing more than those replies came.
    c.call(&resp(&["PING"]), PONG);
}

#[test]
fn every_verb_in_inline_and_resp_form() {
    let server = TestServer::start(2);
    verb_script(server.addr, Form::Inline, "inline-");
    verb_script(server.addr, Form::Resp, "resp-");
}

#[test]
fn conn_with_an_id_and_mixed_forms_on_one_connection() {
    let server = TestServer::start(2);
    let mut c = Raw::connect(server.addr);
    c.call(b"CONN chosen-id\r\n", b"+chosen-id\r\n");
    c.call(b"AQ mixed\r\n", ONE);
    c.call(&resp(&["LOCKED", "mixed"]), ONE);
    c.call(b"RELEASE mixed\r\n", ONE);
    // The same id on a new connection gets the same reply, in RESP form.
    let mut d = Raw::connect(server.addr);
    d.call(&resp(&["CONN", "chosen-id"]), b"+chosen-id\r\n");
    // CONN with an empty id is an argument error; the connection stays usable.
    let mut e = Raw::connect(server.addr);
    e.call(&resp(&["CONN", ""]), E_ARGS);
    e.call(b"PING\r\n", E_CONN);
    e.call(b"CONN\r\n", b"");
    let id = e.line();
    assert_uuid4(std::str::from_utf8(&id[1..id.len() - 2]).unwrap());
}

#[test]
fn inline_lines_split_on_single_spaces_like_server_py() {
    let server = TestServer::start(1);
    let (mut c, _) = Raw::conn(server.addr, None);
    c.call(b"AQ  doubled\r\n", E_ARGS); // ["AQ", "", "doubled"]
    c.call(b"AQ trailing \r\n", E_ARGS); // ["AQ", "trailing", ""]
    c.call(b"PING \r\n", PONG);
    c.call(b"AQ\tx\r\n", E_UNKNOWN); // one part "AQ\tx"
    c.call(b"AQ x\t\r\n", ONE); // parts are stripped
    c.call(b"LOCKED x\r\n", ONE);
    c.call(b"\r\nPING\r\n", PONG); // the line runs to the first CRLF after its first byte
}

#[test]
fn a_whole_command_in_one_bulk_string_is_an_unknown_verb() {
    let server = TestServer::start(2);
    let mut c = Raw::connect(server.addr);
    c.call(b"$7\r\nAQ lock\r\n", E_CONN);
    c.call(b"$4\r\nCONN\r\n", b"");
    assert!(c.line().starts_with(b"+"));
    c.call(b"$7\r\nAQ lock\r\n", E_UNKNOWN);
    c.call(b"$18\r\nSIGSET lock CANCEL\r\n", E_UNKNOWN);
    // A lone bulk string is a verb without arguments.
    c.call(b"$4\r\nPING\r\n", PONG);
    c.call(b"$2\r\nAQ\r\n", E_ARGS);
    c.call(b"$4\r\nconn\r\n", E_HAS_ID);
    c.call(&resp(&["LOCKED", "lock"]), ZERO);
}

#[test]
fn find_and_stats_reply_shapes() {
    let data_dir = std::env::temp_dir().join(format!("livelock-compat-{}", std::process::id()));
    let dir = data_dir.clone();
    let server = TestServer::start_with(4, move |config| config.data_dir = dir);
    let (mut c, _) = Raw::conn(server.addr, None);
    let before = unix_now();
    for name in ["find:1", "find:2", "find:10", "other"] {
        c.call(&resp(&["AQ", name]), ONE);
    }
    let after = unix_now();

    // FIND: *N then, per lock, *2 $<len> <name> ,<unix seconds as a Python float>.
    c.send(&resp(&["FIND", "find:?"]));
    let (reply, raw) = c.reply();
    assert!(
        raw.starts_with(b"*2\r\n*2\r\n$6\r\nfind:"),
        "{}",
        show(&raw)
    );
    let Reply::Array(items) = reply else {
        panic!("FIND reply {}", show(&raw))
    };
    let mut names = Vec::new();
    for item in items {
        let Reply::Array(pair) = item else {
            panic!("FIND item {}", show(&raw))
        };
        let [Reply::Blob(name), Reply::Double(since)] = &pair[..] else {
            panic!("FIND item {}", show(&raw))
        };
        assert!(
            (before - 1.0..=after + 1.0).contains(since),
            "{since} not in {before}..{after}"
        );
        names.push(String::from_utf8(name.clone()).unwrap());
    }
    names.sort();
    assert_eq!(names, ["find:1", "find:2"]);
    // The time is formatted as Python's repr(float): digits, one '.', no exponent.
    let text = String::from_utf8_lossy(&raw).into_owned();
    for line in text.split("\r\n").filter(|l| l.starts_with(',')) {
        let digits = &line[1..];
        assert!(
            digits.chars().all(|ch| ch.is_ascii_digit() || ch == '.')
                && digits.matches('.').count() == 1,
            "{line}"
        );
    }
    c.call(&resp(&["FIND", "oth?r"]), b"*1\r\n*2\r\n$5\r\nother\r\n,");
    let rest = c.line();
    assert!(rest.ends_with(b"\r\n"));
    c.call(&resp(&["FIND", "[!fo]*"]), b"*0\r\n");

    // STATS: a RESP3 map whose first entries are server.py's.
    c.send(b"STATS\r\n");
    let (reply, raw) = c.reply();
    let dump_path = data_dir.join("livelock.dump");
    let dump_path = std::path::absolute(&dump_path).unwrap_or(dump_path);
    let want = format!(
        "$10\r\nlock_count\r\n:4\r\n$14\r\ndump_file_path\r\n${}\r\n{}\r\n",
        dump_path.as_os_str().len(),
        dump_path.display()
    );
    let header_end = raw.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    assert!(raw.starts_with(b"%"), "{}", show(&raw));
    assert!(
        raw[header_end..].starts_with(want.as_bytes()),
        "{} does not start with {}",
        show(&raw),
        show(want.as_bytes())
    );
    let Reply::Map(entries) = reply else {
        panic!("STATS reply {}", show(&raw))
    };
    for (key, value) in &entries {
        assert!(matches!(key, Reply::Blob(_)), "{key:?}");
        assert!(
            matches!(value, Reply::Int(_) | Reply::Blob(_) | Reply::Double(_)),
            "{value:?}"
        );
    }
    c.call(b"PING\r\n", PONG);
}

/// One connection's pipeline: CONN and `rounds` groups of commands on names
/// spread over every shard, in one write, both forms mixed. Returns the
/// bytes to send and the replies expected, in order.
fn pipeline(k: usize, rounds: usize) -> (Vec<u8>, Vec<u8>) {
    let mut out = inline(&["CONN", &format!("pipeline-client-{k}")]);
    let mut want = format!("+pipeline-client-{k}\r\n").into_bytes();
    for i in 0..rounds {
        let name = format!("pipe-{k}-{i}");
        let n = name.as_str();
        let form = if (i + k) % 2 == 0 {
            Form::Inline
        } else {
            Form::Resp
        };
        let steps: [(&[&str], &[u8]); 12] = [
            (&["AQ", n], ONE),
            (&["LOCKED", n], ONE),
            (&["AQ", n], ZERO),
            (&["SIGSET", n, "Stop"], ONE),
            (&["SIGEXISTS", n, "stop"], ONE),
            (&["PING"], PONG),
            (&["FIND", "no-such-*"], b"*0\r\n"),
            (&["CONN"], E_HAS_ID),
            (&["RELEASE", n], ONE),
            (&["RELEASE", n], ZERO),
            (&["SIGDEL", n, "stop"], E_NO_KEY),
            (&["AQR", n], ONE),
        ];
        for (parts, reply) in steps {
            out.extend_from_slice(&form.encode(parts));
            want.extend_from_slice(reply);
        }
    }
    (out, want)
}

#[test]
fn pipelined_commands_are_answered_in_order_across_shards() {
    let server = TestServer::start(4);
    let addr = server.addr;
    let workers: Vec<_> = (0..8)
        .map(|k| {
            std::thread::spawn(move || {
                let (bytes, want) = pipeline(k, 60);
                let mut c = Raw::connect(addr);
                c.send(&bytes); // one write: CONN, then 720 commands
                c.expect(&want);
                // Every AQR of the last step holds its lock.
                let mut check = Raw::conn(addr, None).0;
                for i in 0..60 {
                    check.call(&resp(&["AQ", &format!("pipe-{k}-{i}")]), ZERO);
                }
                c.call(b"PING\r\n", PONG);
            })
        })
        .collect();
    for worker in workers {
        bounded("a pipelining connection", move || worker.join()).expect("worker");
    }
}

#[test]
fn pipelined_find_and_stats_keep_their_place() {
    let server = TestServer::start(4);
    let (mut c, _) = Raw::conn(server.addr, None);
    let mut bytes = Vec::new();
    for i in 0..40 {
        bytes.extend(resp(&["AQ", &format!("fs-{i}")]));
        bytes.extend(inline(&["FIND", &format!("fs-{i}")]));
        bytes.extend(resp(&["STATS"]));
        bytes.extend(inline(&["PING"]));
    }
    c.send(&bytes);
    for i in 0..40 {
        c.expect(ONE);
        let (find, raw) = c.reply();
        let Reply::Array(items) = find else {
            panic!("{}", show(&raw))
        };
        assert_eq!(items.len(), 1, "{}", show(&raw));
        let Reply::Array(pair) = &items[0] else {
            panic!("{}", show(&raw))
        };
        assert_eq!(pair[0], Reply::Blob(format!("fs-{i}").into_bytes()));
        let (stats, raw) = c.reply();
        let Reply::Map(entries) = stats else {
            panic!("{}", show(&raw))
        };
        assert_eq!(
            entries[0],
            (Reply::Blob(b"lock_count".to_vec()), Reply::Int(i + 1))
        );
        c.expect(PONG);
    }
}

#[test]
fn oversized_commands_close_only_their_connection() {
    const MAX: usize = 64;
    let server = TestServer::start_with(2, |config| config.max_payload = MAX);
    let addr = server.addr;
    let (mut keeper, _) = Raw::conn(addr, Some("keeper"));
    keeper.call(b"AQ kept\r\n", ONE);

    // max_payload + 1 bytes are accepted (the Python client sends that much).
    let (mut c, _) = Raw::conn(addr, None);
    let fits = resp(&["AQ", &"r".repeat(46)]);
    assert_eq!(fits.len(), MAX + 1);
    c.call(&fits, ONE);
    let fits = inline(&["AQ", &"i".repeat(60)]);
    assert_eq!(fits.len(), MAX + 1);
    c.call(&fits, ONE);

    // One byte more: -6 and the connection is closed.
    let too_big = resp(&["AQ", &"r".repeat(47)]);
    assert_eq!(too_big.len(), MAX + 2);
    let mut r = Raw::conn(addr, None).0;
    r.call(&too_big, E_RESP);
    r.expect_closed();
    let too_big = inline(&["AQ", &"i".repeat(61)]);
    let mut i = Raw::conn(addr, None).0;
    i.call(&too_big, E_RESP);
    i.expect_closed();
    // An inline line with no end in sight, before CONN.
    let mut n = Raw::connect(addr);
    n.call(&[b'A'; MAX + 10], E_RESP);
    n.expect_closed();
    // A length header past the limit is refused at once, without the data.
    let mut h = Raw::conn(addr, None).0;
    h.call(b"*2\r\n$2\r\nAQ\r\n$100000\r\n", E_RESP);
    h.expect_closed();
    let mut a = Raw::conn(addr, None).0;
    a.call(b"*100000\r\n", E_RESP);
    a.expect_closed();

    // The other sessions carry on.
    keeper.call(b"PING\r\n", PONG);
    keeper.call(b"LOCKED kept\r\n", ONE);
    c.call(&resp(&["AQ", "kept"]), ZERO);
    c.call(&inline(&["LOCKED", &"r".repeat(46)]), ONE);
    keeper.call(b"RELEASE kept\r\n", ONE);
}

#[test]
fn malformed_resp_gets_error_6_and_close() {
    let server = TestServer::start(2);
    let addr = server.addr;
    let (mut keeper, _) = Raw::conn(addr, None);
    keeper.call(b"AQ keeper-lock\r\n", ONE);
    let cases: &[&[u8]] = &[
        b"*x\r\n",
        b"*-1\r\n",
        b"*0\r\n",
        b"$-1\r\n",
        b"*1\r\n$4\r\nPINGxx\r\n",
        b"*1\r\n*1\r\n$4\r\nPING\r\n",
        b"*1\r\n+PING\r\n",
        b":1\r\n",
        b",1.5\r\n",
        b"*1\r\n$ 4\r\nPING\r\n",
        b"\xff\xfe\r\n",
    ];
    for bad in cases {
        // After CONN...
        let (mut c, _) = Raw::conn(addr, None);
        c.call(b"PING\r\n", PONG);
        c.call(bad, E_RESP);
        c.expect_closed();
        // ...and as the very first bytes.
        let mut c = Raw::connect(addr);
        c.call(bad, E_RESP);
        c.expect_closed();
    }
    keeper.call(b"PING\r\n", PONG);
    keeper.call(b"LOCKED keeper-lock\r\n", ONE);
}

#[test]
fn password_state_machine() {
    let server = TestServer::start_with(2, |config| config.password = Some(b"s3cret".to_vec()));
    let addr = server.addr;
    // Anything but the right PASS: -5, then the connection is closed.
    for first in [
        inline(&["PASS", "wrong"]),
        resp(&["PASS", "wrong"]),
        resp(&["PASS"]),
        resp(&["PASS", "s3cret", "extra"]),
        inline(&["pass", "S3CRET"]),
        inline(&["CONN"]),
        resp(&["CONN", "some-id"]),
        inline(&["PING"]),
        inline(&["NOSUCHVERB"]),
    ] {
        let mut c = Raw::connect(addr);
        c.call(&first, E_PASS);
        c.expect_closed();
    }
    // The right PASS, in either form and case: +1, then CONN as usual.
    for (form, verb) in [(Form::Inline, "PASS"), (Form::Resp, "pass")] {
        let mut c = Raw::connect(addr);
        c.call(&form.encode(&[verb, "s3cret"]), ONE);
        c.call(&form.encode(&["PING"]), E_CONN);
        let id = c.do_conn(form, None);
        assert_uuid4(&id);
        c.call(&form.encode(&["PASS", "s3cret"]), E_UNKNOWN);
        c.call(
            &form.encode(&["AQ", "pw-lock"]),
            if form == Form::Inline { ONE } else { ZERO },
        );
        c.call(&form.encode(&["PING"]), PONG);
    }
}

#[test]
fn shutdown_command_with_support() {
    let server = TestServer::start_with(2, |config| config.shutdown_support = true);
    let (mut other, _) = Raw::conn(server.addr, None);
    other.call(b"PING\r\n", PONG);
    let (mut c, _) = Raw::conn(server.addr, None);
    c.call(&resp(&["SHUTDOWN"]), ONE);
    c.expect_closed();
    other.expect_closed();
    let server = server;
    bounded("the server to stop", move || drop(server));
}

#[test]
fn a_client_id_takes_its_locks_back_on_a_new_connection() {
    let server = TestServer::start_with(4, |config| {
        config.release_all_timeout = Duration::from_secs(60)
    });
    let addr = server.addr;
    let names: Vec<String> = (0..16).map(|i| format!("back-{i}")).collect();
    let (mut first, _) = Raw::conn(addr, Some("returning"));
    for name in &names {
        first.call(&resp(&["AQ", name]), ONE);
    }
    drop(first);
    let (mut other, _) = Raw::conn(addr, None);
    for name in &names {
        other.call(&resp(&["AQ", name]), ZERO);
    }
    let (mut again, _) = Raw::conn(addr, Some("returning"));
    for name in &names {
        again.call(&resp(&["AQR", name]), ONE);
        again.call(&resp(&["RELEASE", name]), ONE);
        other.call(&resp(&["AQ", name]), ONE);
    }
}

#[test]
fn livelock_and_native_clients_exclude_each_other() {
    let server = TestServer::start_with(4, |config| config.release_all_timeout = Duration::ZERO);
    let addr = server.addr;
    let native = server.client();
    let (mut ll, _) = Raw::conn(addr, None);
    for i in 0..24 {
        let name = format!("mixed-{i}");
        // LiveLock holds: the native client is refused.
        ll.call(&resp(&["AQ", &name]), ONE);
        assert!(native.try_acquire(&name).expect("try_acquire").is_none());
        ll.call(&resp(&["RELEASE", &name]), ONE);
        // Native holds: LiveLock is refused, and sees it locked.
        let guard = native
            .try_acquire(&name)
            .expect("try_acquire")
            .expect("free after RELEASE");
        ll.call(&inline(&["AQ", &name]), ZERO);
        ll.call(&inline(&["AQR", &name]), ZERO);
        ll.call(&inline(&["LOCKED", &name]), ONE);
        ll.call(&inline(&["RELEASE", &name]), ZERO);
        guard.release().expect("release");
        ll.call(&inline(&["LOCKED", &name]), ZERO);
        ll.call(&inline(&["AQ", &name]), ONE);
        ll.call(&inline(&["RELEASE", &name]), ONE);
    }

    // A native waiter queued behind a LiveLock holder gets the lock on RELEASE...
    ll.call(b"AQ handover\r\n", ONE);
    let options = AcquireOptions {
        wait: Some(WAIT_MAX),
        ..AcquireOptions::default()
    };
    let mut pending = native
        .start_acquire("handover", options, true)
        .expect("start_acquire");
    assert!(pending.wait_queued(WAIT_MAX).expect("queued"), "not queued");
    ll.call(b"RELEASE handover\r\n", ONE);
    let guard = bounded("the handover", move || pending.wait()).expect("granted");
    ll.call(b"AQ handover\r\n", ZERO);
    drop(guard);

    // ...and when the LiveLock connection goes (no grace here).
    let (mut holder, _) = Raw::conn(addr, None);
    holder.call(b"AQ on-close\r\n", ONE);
    let mut pending = native
        .start_acquire("on-close", options, true)
        .expect("start_acquire");
    assert!(pending.wait_queued(WAIT_MAX).expect("queued"), "not queued");
    drop(holder);
    let guard = bounded("the grant after close", move || pending.wait()).expect("granted");
    ll.call(b"LOCKED on-close\r\n", ONE);
    guard.release().expect("release");
    ll.call(b"AQ on-close\r\n", ONE);
}

/// The STATS entry `key` as an integer.
fn stat(c: &mut Raw, key: &str) -> i64 {
    c.send(&resp(&["STATS"]));
    let (reply, raw) = c.reply();
    let Reply::Map(entries) = reply else {
        panic!("STATS reply {}", show(&raw))
    };
    entries
        .into_iter()
        .find_map(|(k, v)| match (k, v) {
            (Reply::Blob(k), Reply::Int(v)) if k == key.as_bytes() => Some(v),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {key} in {}", show(&raw)))
}

fn wait_for_stat(c: &mut Raw, key: &str, want: i64) {
    let deadline = Instant::now() + WAIT_MAX;
    while stat(c, key) != want {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {key} = {want}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Server bug (see the report): when the latest connection of a client id
/// closes and its grace runs out, an older connection of the same id still
/// points at the ended session, and its next lock command panics the loop
/// (`compat.rs`: "a connection's session lives at home").
#[test]
fn an_older_connection_outliving_its_client_ids_grace() {
    // A grace long enough to be seen detached on a loaded machine; the
    // test waits for its end (bounded), not for a time.
    let server = TestServer::start_with(2, |config| {
        config.release_all_timeout = Duration::from_secs(2)
    });
    let addr = server.addr;
    let (mut observer, _) = Raw::conn(addr, None);
    let (mut older, _) = Raw::conn(addr, Some("shared-id"));
    let (latest, _) = Raw::conn(addr, Some("shared-id"));
    older.call(b"AQ held-by-shared\r\n", ONE);
    drop(latest);
    wait_for_stat(&mut observer, "sessions_detached", 1);
    wait_for_stat(&mut observer, "sessions_detached", 0); // the grace is over
    observer.call(b"AQ held-by-shared\r\n", ONE);
    // The older connection must get an answer (which one is for the fix to
    // decide: -1 CONN required first, or a fresh session for the id).
    older.send(b"AQ another\r\n");
    let (reply, raw) = older.reply();
    assert!(
        matches!(reply, Reply::Simple(_) | Reply::Error(_)),
        "{}",
        show(&raw)
    );
    // Every loop still serves.
    for i in 0..16 {
        let (mut c, _) = Raw::conn(addr, Some(&format!("after-{i}")));
        c.call(&resp(&["AQ", &format!("after-lock-{i}")]), ONE);
    }
}

// ---- bounds after normalisation (safety issue, item 12) -------------------

/// A signal that grows past its limit when lowercased (`İ` is 2 bytes, its
/// lowercase 3), and a client id over 1024 bytes, are refused with `-2`; the
/// dump written at shutdown is whole (the writer used to panic on them, so
/// no dump was written and every hold was lost).
#[test]
fn lengths_are_checked_after_lowercasing_and_the_dump_is_written() {
    let dir = common::ScratchDir::new("compat-long");
    let data_dir = dir.path().to_path_buf();
    let server = TestServer::start_with(2, move |config| {
        config.max_payload = 8192;
        config.data_dir = data_dir;
        config.dump_save = true;
        config.release_all_timeout = Duration::from_secs(30);
    });
    let (mut c, _) = Raw::conn(server.addr, Some("signaller"));
    c.call(&resp(&["AQ", "x"]), ONE);
    let grows = "İ".repeat(400); // 800 bytes, 1200 once lowercased
    c.call(&resp(&["SIGSET", "x", &grows]), E_ARGS);
    c.call(&resp(&["SIGSET", "x", "short"]), ONE);
    let long_id = "c".repeat(1025);
    let mut other = Raw::connect(server.addr);
    other.call(&resp(&["CONN", &long_id]), E_ARGS);
    drop(other);
    let mut server = server;
    let running = server.server.take().unwrap();
    running.shutdown();
    bounded("the shutdown", move || running.join()).expect("the dump is written");
    let state = livelock::data_dir::load_dump(&dir.join("livelock.dump"))
        .expect("a whole dump")
        .expect("written");
    assert_eq!(state.holds.len(), 1, "{state:?}");
    assert_eq!(state.signals, [(b"x".to_vec(), b"short".to_vec())]);
}

// ---- inline lines with leading spaces (safety issue, section E) ----------

/// `"  AQ x"` as livelock 0.7.11's server.py answers it (checked against
/// the Python server on 127.0.0.1): the line is split on single spaces
/// before each part is stripped, so leading spaces make empty parts and the
/// *verb* is the empty first part: `-1` before CONN, `-4 Unknown command`
/// after it (nothing is acquired), `-5` and close while a password is
/// owed. A leading tab is different: it is stripped off the first part
/// (`"\tAQ y"` is `AQ y`). These bytes are also the first of their
/// connection, which makes it a LiveLock one (not `0xF1`).
#[test]
fn inline_lines_with_leading_spaces_like_server_py() {
    let server = TestServer::start(2);
    let mut c = Raw::connect(server.addr);
    c.call(b"  AQ x\r\n", E_CONN);
    c.call(b" \r\n", E_CONN);
    c.call(b"CONN\r\n", b"");
    assert!(c.line().starts_with(b"+"));
    c.call(b"  AQ x\r\n", E_UNKNOWN); // ["", "", "AQ", "x"]
    c.call(b" AQ x\r\n", E_UNKNOWN); // ["", "AQ", "x"]
    c.call(b"  PING\r\n", E_UNKNOWN);
    c.call(b" CONN\r\n", E_UNKNOWN); // not CONN, so not -3 either
    c.call(b"\t AQ x\r\n", E_UNKNOWN); // ["\t", "AQ", "x"] -> ["", "AQ", "x"]
    c.call(b"  \r\n", E_UNKNOWN);
    c.call(b"LOCKED x\r\n", ZERO); // none of the above took x
    c.call(b"\tAQ x\r\n", ONE); // ["\tAQ", "x"] -> ["AQ", "x"]
    c.call(b"LOCKED x\r\n", ONE);
    c.call(b"PING  \r\n", PONG); // trailing parts are ignored by PING

    let server = TestServer::start_with(2, |config| config.password = Some(b"pw".to_vec()));
    let mut c = Raw::connect(server.addr);
    c.call(b"  PASS pw\r\n", E_PASS);
    c.expect_closed();
    let mut c = Raw::connect(server.addr);
    c.call(b"PASS pw\r\n", ONE);
    c.call(b"  CONN\r\n", E_CONN);
}

// ---- late replies and reused connection slots (safety issue, item 8) ------

/// A LiveLock client's FIND is still being answered (a slow scan) when its
/// connection is reset; the same client id reconnects, lands in the freed
/// slot of the same loop, and asks its own FIND. The first FIND's late
/// answer must not be taken for the second's (it used to be: the reply
/// went to whatever connection of the session sat in the slot, and every
/// later reply was off by one).
#[test]
fn a_late_reply_never_reaches_the_next_connection_of_the_client_id() {
    // One loop: the freed slot is the next one taken. Commands up to 4 KiB
    // (the patterns are 1 KiB).
    let server = TestServer::start_with(1, |config| config.max_payload = 4096);
    let addr = server.addr;
    // 20,000 locks whose names cost ~2,700 glob steps each against the
    // patterns below, so each FIND scans for a second or more.
    let holder = server.client();
    let names: Vec<String> = (0..20_000)
        .map(|i| format!("{}-{i:07}", "a".repeat(72)))
        .collect();
    for chunk in names.chunks(1000) {
        let pending: Vec<_> = chunk
            .iter()
            .map(|n| {
                holder
                    .start_acquire(n, AcquireOptions::default(), false)
                    .unwrap()
            })
            .collect();
        for p in pending {
            p.wait().unwrap().forget();
        }
    }
    let special = format!("{}b", "a".repeat(1022));
    holder.acquire(&special).unwrap().forget();
    let slow_none = format!("*{}c", "a".repeat(1022)); // matches nothing
    let slow_one = format!("*{}b", "a".repeat(1022)); // matches `special`

    let (mut first, _) = Raw::conn(addr, Some("late"));
    first.send(&resp(&["FIND", &slow_none]));
    // Give the server time to start that FIND's scan (it takes seconds).
    // Not a condition of the test passing: a late start only makes this
    // run miss the race it looks for.
    std::thread::sleep(Duration::from_millis(300));
    // Reset (not FIN): the server drops the connection at once, slot freed.
    socket2::SockRef::from(&first.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(first);
    common::wait_until("the reset connection closed", || {
        holder.stats().unwrap().connections == 1
    });
    let (mut second, _) = Raw::conn(addr, Some("late"));
    second.send(&resp(&["FIND", &slow_one]));
    let (reply, raw) = second.reply();
    match reply {
        Reply::Array(items) => assert_eq!(items.len(), 1, "{}", show(&raw)),
        _ => panic!("FIND answered with {}", show(&raw)),
    }
    assert!(
        raw.windows(special.len()).any(|w| w == special.as_bytes()),
        "the answer to the first FIND: {}",
        show(&raw)
    );
    second.call(b"PING\r\n", PONG);
}
