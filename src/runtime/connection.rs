//! One client connection's socket and buffers, and nothing else: reading
//! until the kernel has no more (or the read buffer is full), writing until
//! the kernel takes no more, through TLS when the connection opened with a
//! TLS record. What the bytes mean is the event loop's and the codecs'
//! business.

use std::io::{self, Read, Write};

use mio::net::TcpStream;
use mio::Token;

use crate::limits::READ_BUFFER_MAX;
use crate::lock_table::SessionId;

/// Which wire protocol the connection speaks, chosen by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// No byte seen yet.
    Sniffing,
    /// First byte `protocol::MAGIC_BYTE0`.
    Native,
    /// Any other first byte: the LiveLock RESP/inline protocol.
    Resp,
}

/// Makes room for one read at the end of `rbuf` (undecoded bytes from
/// `rpos`): `None` when READ_BUFFER_MAX of them wait; else where the read
/// goes and how much it may take (the buffer is extended by that much).
fn reserve(rbuf: &mut Vec<u8>, rpos: &mut usize) -> Option<(usize, usize)> {
    let held = rbuf.len() - *rpos;
    if held >= READ_BUFFER_MAX {
        return None;
    }
    if *rpos > 0 && rbuf.capacity() - rbuf.len() < READ_CHUNK {
        // Move the undecoded tail to the front before growing.
        rbuf.drain(..*rpos);
        *rpos = 0;
    }
    let start = rbuf.len();
    let room = READ_CHUNK.min(READ_BUFFER_MAX - held);
    rbuf.resize(start + room, 0);
    Some((start, room))
}

/// How the connection's bytes travel.
pub enum Transport {
    /// No byte read yet: TLS or not is decided by the first one.
    Undecided,
    Plain,
    Tls(Box<rustls::ServerConnection>),
}

/// What a read pass found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadState {
    /// The kernel has nothing more for now.
    Drained,
    /// The read buffer is full; more may be waiting in the kernel.
    Full,
    /// The peer closed its side.
    Eof,
}

/// A connection slot and the generation of the connection in it. Slots are
/// reused; generations never are (per loop), so a late reply addressed to a
/// connection that is gone matches nothing instead of its slot's new tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    pub token: Token,
    pub gen: u64,
}

impl ConnRef {
    /// Names no connection (generations start at 1): for requests restored
    /// from a dump, whose connection is long gone.
    pub const NONE: ConnRef = ConnRef {
        token: Token(usize::MAX),
        gen: 0,
    };
}

/// Bytes read per `read` call at least (the buffer grows in such steps).
const READ_CHUNK: usize = 4096;

pub struct Connection {
    pub transport: Transport,
    pub stream: TcpStream,
    /// Set by the loop when the connection is added (see `ConnRef`).
    pub gen: u64,
    pub codec: Codec,
    pub session: Option<SessionId>,
    /// Received bytes; `rbuf[rpos..]` is not yet decoded.
    pub rbuf: Vec<u8>,
    pub rpos: usize,
    /// Encoded replies; `wbuf[wpos..]` is not yet written.
    pub wbuf: Vec<u8>,
    pub wpos: usize,
    /// A new connection must say HELLO/RESUME before this instant (0: it did).
    pub hello_deadline_ms: u64,
    /// Close once `wbuf` is written (after BYE, a fatal error, shutdown).
    pub closing: bool,
    /// Reading stopped because the peer does not read its replies.
    pub paused: bool,
    /// Listed in the loop's dirty list (has output to flush this turn).
    pub dirty: bool,
    /// Listed in the loop's ready list (has input to look at).
    pub ready: bool,
    /// The peer sent FIN: decode what is left, then close.
    pub eof: bool,
    /// The poller saw the peer's FIN: read to the end, not just one short read.
    pub peer_closed: bool,
    /// LiveLock protocol: PASS was given, or no password is set.
    pub authed: bool,
    /// LiveLock protocol: a command is being answered; the next one waits.
    pub awaiting: bool,
    /// Output bytes ever dropped from the front of `wbuf` (written and
    /// cleared), so that `released` counts from the connection's start.
    pub wbase: u64,
    /// Output up to this byte (counted like `wbase`) may be written:
    /// `--durability log` holds a turn's output until its changes are
    /// durable (`EventLoop::commit_turn`); otherwise it is `u64::MAX`.
    pub released: u64,
    /// Output was added this turn and is not yet held or released (log
    /// only; always true otherwise, so nothing is listed).
    pub written: bool,
    /// The last log sequence number output of this connection waits for.
    pub held_until: u64,
}

impl Connection {
    pub fn new(stream: TcpStream, hello_deadline_ms: u64) -> Connection {
        Connection {
            transport: Transport::Undecided,
            stream,
            gen: 0,
            codec: Codec::Sniffing,
            session: None,
            rbuf: Vec::new(),
            rpos: 0,
            wbuf: Vec::new(),
            wpos: 0,
            hello_deadline_ms,
            closing: false,
            paused: false,
            dirty: false,
            ready: false,
            eof: false,
            peer_closed: false,
            authed: false,
            awaiting: false,
            wbase: 0,
            released: u64::MAX,
            written: true,
            held_until: 0,
        }
    }

    /// Holds every output byte until released (`--durability log`).
    pub fn hold_output(&mut self) {
        self.released = self.wbase;
        self.written = false;
    }

    /// Bytes of output not yet taken by the kernel.
    pub fn unwritten(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Reads until the kernel has no more, the buffer is full, or EOF;
    /// the first bytes decide TLS (`tls`: the server's setup, if any).
    pub fn fill(&mut self, tls: Option<&crate::tls::Tls>) -> io::Result<ReadState> {
        if self.rpos > 0 && self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        }
        match self.transport {
            Transport::Plain => self.fill_plain(),
            Transport::Tls(_) => self.fill_tls(),
            Transport::Undecided => {
                let state = self.fill_plain()?;
                let Some(&first) = self.rbuf.get(self.rpos) else {
                    return Ok(state);
                };
                match tls {
                    Some(tls) if first == crate::tls::HANDSHAKE_RECORD => {
                        let mut session = rustls::ServerConnection::new(tls.config())
                            .map_err(io::Error::other)?;
                        // What was read is the start of the TLS stream.
                        let mut read = &self.rbuf[self.rpos..];
                        while !read.is_empty() {
                            session.read_tls(&mut read)?;
                            session.process_new_packets().map_err(io::Error::other)?;
                        }
                        self.rbuf.clear();
                        self.rpos = 0;
                        self.transport = Transport::Tls(Box::new(session));
                        match state {
                            ReadState::Eof => Ok(ReadState::Eof),
                            _ => self.fill_tls(),
                        }
                    }
                    Some(tls) if tls.required() => Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "TLS is required on this server",
                    )),
                    _ => {
                        self.transport = Transport::Plain;
                        Ok(state)
                    }
                }
            }
        }
    }

    /// `fill` through TLS: ciphertext from the socket until it has no more,
    /// plaintext into the read buffer (bounded like a plain read).
    fn fill_tls(&mut self) -> io::Result<ReadState> {
        let Transport::Tls(session) = &mut self.transport else {
            unreachable!("a TLS connection");
        };
        let mut state = ReadState::Drained;
        loop {
            // Plaintext first: what rustls has decrypted already.
            loop {
                let Some((start, _)) = reserve(&mut self.rbuf, &mut self.rpos) else {
                    return Ok(ReadState::Full);
                };
                match session.reader().read(&mut self.rbuf[start..]) {
                    Ok(0) => {
                        // close_notify: the peer is done.
                        self.rbuf.truncate(start);
                        return Ok(ReadState::Eof);
                    }
                    Ok(n) => self.rbuf.truncate(start + n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.rbuf.truncate(start);
                        break;
                    }
                    // The peer closed TCP without close_notify: what it
                    // sent before is decrypted already and is answered.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.rbuf.truncate(start);
                        return Ok(ReadState::Eof);
                    }
                    Err(e) => {
                        self.rbuf.truncate(start);
                        return Err(e);
                    }
                }
            }
            if state == ReadState::Eof {
                return Ok(ReadState::Eof);
            }
            match session.read_tls(&mut self.stream) {
                Ok(0) => state = ReadState::Eof,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = session.process_new_packets() {
                // Tell the peer why (an alert), then give up.
                let _ = session.write_tls(&mut self.stream);
                return Err(io::Error::other(e));
            }
        }
        // Handshake messages and alerts go out now; the rest is `flush`'s.
        while session.wants_write() {
            match session.write_tls(&mut self.stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(state)
    }

    fn fill_plain(&mut self) -> io::Result<ReadState> {
        loop {
            let Some((start, room)) = reserve(&mut self.rbuf, &mut self.rpos) else {
                return Ok(ReadState::Full);
            };
            match self.stream.read(&mut self.rbuf[start..]) {
                Ok(0) => {
                    self.rbuf.truncate(start);
                    return Ok(ReadState::Eof);
                }
                Ok(n) => {
                    self.rbuf.truncate(start + n);
                    if n < room && !self.peer_closed {
                        // The socket had less than we asked for: it is empty
                        // now. With edge-triggered epoll the next arrival
                        // raises a new event, so the read that would only
                        // say WouldBlock is skipped (one syscall per request).
                        return Ok(ReadState::Drained);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.rbuf.truncate(start);
                    return Ok(ReadState::Drained);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.rbuf.truncate(start),
                Err(e) => {
                    self.rbuf.truncate(start);
                    return Err(e);
                }
            }
        }
    }

    /// Marks `consumed` more bytes as decoded and gives memory back when idle.
    pub fn consume(&mut self, consumed: usize) {
        self.rpos += consumed;
        debug_assert!(self.rpos <= self.rbuf.len());
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
            if self.rbuf.capacity() > 4 * READ_CHUNK {
                self.rbuf = Vec::new();
            }
        }
    }

    /// Writes what is released until the kernel takes no more. `Ok(true)`
    /// when all is written.
    pub fn flush(&mut self) -> io::Result<bool> {
        let released = self.released.saturating_sub(self.wbase);
        let limit = self
            .wbuf
            .len()
            .min(usize::try_from(released).unwrap_or(usize::MAX));
        let sent = match &mut self.transport {
            Transport::Tls(session) => send_tls(
                session,
                &mut self.stream,
                &self.wbuf[..limit],
                &mut self.wpos,
            )?,
            Transport::Plain | Transport::Undecided => {
                send_plain(&mut self.stream, &self.wbuf[..limit], &mut self.wpos)?
            }
        };
        if !sent {
            return Ok(false);
        }
        if self.wpos < self.wbuf.len() {
            // The rest waits for the log.
            return Ok(false);
        }
        self.wbase += self.wbuf.len() as u64;
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > 64 * READ_CHUNK {
            self.wbuf = Vec::new();
        }
        Ok(true)
    }
}

/// Writes `out[*pos..]` until the kernel takes no more; whether all went.
fn send_plain(stream: &mut TcpStream, out: &[u8], pos: &mut usize) -> io::Result<bool> {
    while *pos < out.len() {
        match stream.write(&out[*pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// `send_plain` through TLS: plaintext into rustls (it takes what its
/// buffer allows), records out to the socket, until both are done (also
/// what the handshake left to send).
fn send_tls(
    session: &mut rustls::ServerConnection,
    stream: &mut TcpStream,
    out: &[u8],
    pos: &mut usize,
) -> io::Result<bool> {
    loop {
        while *pos < out.len() {
            match session.writer().write(&out[*pos..])? {
                0 => break,
                n => *pos += n,
            }
        }
        if !session.wants_write() {
            return Ok(true);
        }
        match session.write_tls(stream) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
