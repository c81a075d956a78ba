//! Audit of the event loop, sessions and connections (tests that failed when
//! written are marked CONFIRMED BUG: they fail until the bug is fixed).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Instant;

use common::{RawConn, TestServer, WAIT_MAX};
use livelock::limits::WRITE_BUFFER_MAX;
use livelock::lock_table::Mode;
use livelock::protocol::{opcode, Request, SignalKind, Status, SECRET_LEN};

/// A LiveLock-protocol connection reading line replies.
struct TextConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl TextConn {
    fn connect(addr: SocketAddr) -> TextConn {
        let stream = TcpStream::connect_timeout(&addr, WAIT_MAX).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_write_timeout(Some(WAIT_MAX)).unwrap();
        TextConn {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\r\n").unwrap();
    }

    /// The next `\r\n`-terminated line, or None if the server closed.
    fn line(&mut self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..at + 2).collect();
                return Some(line);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no line within {WAIT_MAX:?}");
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn call(&mut self, line: &str) -> Vec<u8> {
        self.send(line);
        self.line()
            .unwrap_or_else(|| panic!("closed after {line:?}"))
    }
}

/// Reads until the server closes (bounded).
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + WAIT_MAX;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the server did not close; got {out:?}");
        stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("read: {e}"),
        }
    }
}

// ---- CONFIRMED BUG 1 ----------------------------------------------------
//
// LiveLock client-id sessions are created with an all-zero secret
// (`Sessions::create_client`) and live in the same id space as native
// sessions; `native::resume` only compares the secret. Session ids are
// sequential (`seq << 8 | home`), so any native client can RESUME a LiveLock
// client's session with secret [0; 16]: it takes the session over (the
// LiveLock connection gets a binary SESSION_TAKEN push and is closed), can
// BYE it (releasing the client's locks), and its own native requests are
// answered into `session.parked` (deliver treats the session as LiveLock),
// i.e. never.

#[test]
fn native_resume_cannot_hijack_a_livelock_client_id() {
    let server = TestServer::start(1);
    let mut text = TextConn::connect(server.addr);
    assert_eq!(text.call("CONN victim"), b"+victim\r\n");
    assert_eq!(text.call("AQ precious"), b"+1\r\n");

    // The first session of loop 0 has id 1 << 8.
    let mut raw = RawConn::connect(server.addr);
    let resume = Request::Resume {
        session_id: 1 << 8,
        secret: [0; SECRET_LEN],
        password: b"",
    };
    let reply = raw.call(1, &resume);
    assert_eq!(
        reply.status,
        Status::UnknownSession,
        "a native RESUME with an all-zero secret took over LiveLock client 'victim'"
    );
    // And the LiveLock connection is untouched.
    assert_eq!(text.call("LOCKED precious"), b"+1\r\n");
}

// ---- CONFIRMED BUG 2 ----------------------------------------------------
//
// While a session is detached, SIGNALLED pushes for the locks it holds are
// appended to `Session::parked` without any bound (`EventLoop::deliver`,
// `_ => &mut session.parked`). The documented bound ("one final reply per
// request in flight plus one LOCK_LOST per hold") ignores signals, and
// raising the same signal again notifies again (`LockTable::signal`). Any
// session can therefore grow the server's memory without limit for as long
// as the grace lasts (up to an hour), times every detached holder; an
// attached connection would have been closed at WRITE_BUFFER_MAX.

#[test]
fn parked_signal_pushes_of_a_detached_session_are_bounded() {
    let server = TestServer::start(1);
    let name = vec![b'n'; 1024];
    let signal = vec![b's'; 1024];

    let (mut holder, id, secret) = RawConn::hello(server.addr, 60_000);
    let acquire = Request::Acquire {
        name: &name,
        mode: Mode::Exclusive,
        weight: 1,
        capacity: 0,
        wait_ms: 0,
        lease_ms: 0,
        notify_queued: false,
    };
    assert_eq!(holder.call(2, &acquire).status, Status::Ok);
    drop(holder);
    let watcher = server.client();
    common::wait_until("the holder to be detached", || {
        watcher.stats().unwrap().sessions_detached == 1
    });

    // About 2 KiB parked per raise: 2600 raises park ~5.4 MB.
    let raises = 2600u32;
    let (mut raiser, _, _) = RawConn::hello(server.addr, 0);
    let raise = Request::Signal {
        name: &name,
        signal: &signal,
        op: SignalKind::Raise,
    };
    let mut next = 10u32;
    while next < 10 + raises {
        let batch_end = (next + 500).min(10 + raises);
        for id in next..batch_end {
            raiser.send(id, &raise);
        }
        for _ in next..batch_end {
            let reply = raiser.recv();
            assert_eq!(reply.status, Status::Ok, "{reply:?}");
        }
        next = batch_end;
    }

    let mut resumed = RawConn::connect(server.addr);
    let resume = Request::Resume {
        session_id: id,
        secret,
        password: b"",
    };
    resumed.send(1, &resume);
    // Today the RESUME reply plus the parked pushes exceed WRITE_BUFFER_MAX,
    // so `flush_dirty` closes the resuming connection: the parked bytes
    // (final replies included) are lost and the client cannot get them back.
    match resumed.recv_within(WAIT_MAX) {
        Ok(frame) => assert_eq!(frame.status, Status::Ok, "{frame:?}"),
        Err(why) => panic!("RESUME of a session with unbounded parked pushes: {why:?}"),
    }
    resumed.send(2, &Request::Ping);
    let mut parked_bytes = 0usize;
    loop {
        let frame = resumed.recv();
        if frame.opcode == opcode::PING && frame.request_id == 2 {
            break;
        }
        if matches!(frame.opcode, opcode::HELD | opcode::HELD_END) {
            continue; // the listing of the session's holds
        }
        assert_eq!(frame.opcode, opcode::SIGNALLED, "{frame:?}");
        parked_bytes += 16 + frame.body.len();
    }
    assert!(
        parked_bytes <= WRITE_BUFFER_MAX,
        "a detached session parked {parked_bytes} bytes of signal pushes (> {WRITE_BUFFER_MAX})"
    );
}

// ---- CONFIRMED BUG 3 ----------------------------------------------------
//
// A half-closed connection (the peer sent FIN after its last request, e.g.
// `printf 'CONN\r\nFIND *\r\n' | nc -N`) loses its replies:
// `service_ready` calls `close()` as soon as nothing is left to decode
// (event_loop.rs, `else if conn.eof { self.close(token) }`), which drops the
// connection with its write buffer unflushed, and also while a LiveLock
// command is still at a shard (`awaiting`) or a query is being gathered.

#[test]
fn a_half_closed_livelock_connection_gets_its_replies() {
    let server = TestServer::start(2);
    for round in 0..20 {
        let mut stream = TcpStream::connect_timeout(&server.addr, WAIT_MAX).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
            .write_all(b"CONN\r\nFIND *\r\nPING\r\n")
            .expect("write");
        stream.shutdown(Shutdown::Write).unwrap();
        let got = read_to_close(&mut stream);
        assert!(
            got.ends_with(b"+PONG\r\n"),
            "round {round}: replies lost at half-close: {:?}",
            got.escape_ascii().to_string()
        );
    }
}

#[test]
fn a_half_closed_native_connection_gets_its_replies() {
    let server = TestServer::start(1);
    for round in 0..20 {
        let (mut raw, _, _) = RawConn::hello(server.addr, 0);
        let mut bytes = Vec::new();
        livelock::protocol::encode_request(&mut bytes, 2, &Request::Ping);
        livelock::protocol::encode_request(&mut bytes, 3, &Request::Ping);
        raw.send_bytes(&bytes);
        raw.stream.shutdown(Shutdown::Write).unwrap();
        let frames = raw.expect_closed();
        let ids: Vec<u32> = frames.iter().map(|f| f.request_id).collect();
        assert_eq!(ids, vec![2, 3], "round {round}: replies lost at half-close");
    }
}

// ---- CONFIRMED BUG 4 ----------------------------------------------------
//
// BYE promises a final reply to every request in flight, but INSPECT, LIST
// and STATS are not in `Session::pending`: they live in `gathers`, and
// `gather_part` drops the answer once the connection lost its session (or
// closed). A STATS pipelined before BYE on a multi-loop server gets no reply.

#[test]
fn bye_answers_a_stats_still_being_gathered() {
    let server = TestServer::start(4);
    for round in 0..10 {
        let (mut raw, _, _) = RawConn::hello(server.addr, 0);
        let mut bytes = Vec::new();
        livelock::protocol::encode_request(&mut bytes, 2, &Request::Stats);
        livelock::protocol::encode_request(&mut bytes, 3, &Request::Bye);
        raw.send_bytes(&bytes);
        let frames = raw.expect_closed();
        let ids: Vec<u32> = frames.iter().map(|f| f.request_id).collect();
        assert!(
            ids.contains(&2),
            "round {round}: STATS before BYE got no reply: {frames:?}"
        );
    }
}

// ---- regression: migration keeps bytes in order ---------------------------

/// A LiveLock connection whose CONN moves it to another loop, with commands
/// pipelined behind the CONN in the same write: every reply, in order.
#[test]
fn conn_migration_keeps_pipelined_commands_in_order() {
    let server = TestServer::start(4);
    for i in 0..16 {
        let mut text = TextConn::connect(server.addr);
        let id = format!("mig-{i}");
        let mut batch = String::new();
        batch.push_str("PING\r\n");
        batch.push_str(&format!("CONN {id}\r\n"));
        for k in 0..8 {
            batch.push_str(&format!(
                "AQ mig-lock-{i}-{k}\r\nLOCKED mig-lock-{i}-{k}\r\n"
            ));
        }
        batch.push_str("PING\r\n");
        text.stream.write_all(batch.as_bytes()).unwrap();
        assert_eq!(text.line().unwrap(), b"-1 CONN required first\r\n");
        assert_eq!(text.line().unwrap(), format!("+{id}\r\n").as_bytes());
        for _ in 0..16 {
            assert_eq!(text.line().unwrap(), b"+1\r\n");
        }
        assert_eq!(text.line().unwrap(), b"+PONG\r\n");
    }
}
