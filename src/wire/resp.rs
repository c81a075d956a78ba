//! LiveLock text wire format, byte-compatible with the Python `livelock==0.7.11` server:
//! bytes -> commands ([`decode`], [`parse_command`]) and replies -> bytes (`encode_*`).
//!
//! This module owns the format only: it does no I/O, keeps no connection state, and decoding
//! never allocates (commands borrow from the input buffer).
//!
//! Requests (see `CommandProtocol.receive_commands` in server.py): the first byte of *each*
//! command selects its framing, so one connection may mix both forms:
//! - `*` -- a RESP array of bulk strings: `*2\r\n$2\r\nAQ\r\n$3\r\nfoo\r\n`;
//! - `$` -- a single top-level bulk string, taken as a command without arguments
//!   (server.py wraps a non-list value into a one-element list);
//! - `:` / `,` -- RESP integers/doubles: rejected (server.py crashes its reader task on them);
//! - any other byte -- an inline line `VERB arg arg\r\n`.
//!
//! Replies: `+<text>\r\n`, booleans `+1`/`+0`, errors `-<code> <message>\r\n`, and for FIND /
//! STATS the RESP3 encoding of server.py's `shared.pack_resp`.

use std::fmt;

/// Maximum number of parts (verb included) an [`Args`] keeps.
pub const ARGS_MAX: usize = 8;

/// Borrowed arguments of one command (verb first).
///
/// `len()` counts every part that was sent; it may exceed [`ARGS_MAX`], in which case only the
/// first `ARGS_MAX` parts are kept (no LiveLock command reads more than 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Args<'a> {
    parts: [&'a [u8]; ARGS_MAX],
    len: usize,
    /// Bit i: part i was a RESP integer or double, not a string.
    non_text: u8,
}

impl<'a> Args<'a> {
    /// Builds arguments from parts (verb first), e.g. for another codec; keeps the first
    /// [`ARGS_MAX`] parts and counts all of them.
    pub fn from_parts(parts: &[&'a [u8]]) -> Self {
        let mut args = Args::default();
        for part in parts {
            args.push(part);
        }
        args
    }

    fn push_non_text(&mut self, part: &'a [u8]) {
        if self.len < ARGS_MAX {
            self.non_text |= 1 << self.len;
        }
        self.push(part);
    }

    /// Whether part `i` was sent as a string (bulk or inline), not a number.
    pub fn is_text(&self, i: usize) -> bool {
        i >= ARGS_MAX || self.non_text & (1 << i) == 0
    }

    fn push(&mut self, part: &'a [u8]) {
        if self.len < ARGS_MAX {
            self.parts[self.len] = part;
        }
        self.len += 1;
    }

    /// Number of parts sent, verb included (may exceed [`ARGS_MAX`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is no part at all (never the case for a decoded command).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Part `i` (0 is the verb); `None` past the end or past [`ARGS_MAX`].
    pub fn get(&self, i: usize) -> Option<&'a [u8]> {
        if i < self.len.min(ARGS_MAX) {
            Some(self.parts[i])
        } else {
            None
        }
    }
}

/// Outcome of [`decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// Need more bytes (not an error).
    Incomplete,
    /// One whole command occupying the first `consumed` bytes.
    Command { consumed: usize, args: Args<'a> },
    /// Bytes to skip without replying. Never produced today: server.py does not skip empty
    /// lines. An empty inline line is *not* a command of its own -- its `\r` is taken as the
    /// line's first byte and the line runs to the next `\r\n` (so `\r\nPING\r\n` is one `PING`
    /// and `\r\n\r\n` is one command with an empty verb, answered like any unknown verb:
    /// `-5`, `-1` or `-4` depending on the connection state).
    Empty { consumed: usize },
}

/// Malformed input. server.py never replies `-6` (its `RESP_ERROR` is unused): on most of these
/// its reader task dies and the connection stays open but silent; a few it tolerates (see
/// [`decode`]). The caller decides what to do (e.g. reply `-6 RESP protocol error` and close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// A `*`/`$` header is not `<digits>\r\n` (empty, non-digit, `+`, spaces, bare `\n`...).
    BadLength,
    /// A negative count or length (`*-1`, null bulk `$-1`).
    NegativeLength,
    /// `*0\r\n`: an array without a verb.
    EmptyArray,
    /// A command-array element that is not a bulk string (`:`, `,`, `*`, `+`, ...), or a
    /// top-level `:` / `,` value.
    BadType,
    /// Bulk string data not followed by `\r\n`.
    MissingCrlf,
    /// The command is (or is already known to become) longer than `max_payload` bytes.
    TooLarge,
    /// An inline line that is not valid UTF-8 (server.py decodes the whole line).
    InvalidUtf8,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtocolError::BadLength => "malformed RESP length header",
            ProtocolError::NegativeLength => "negative RESP length",
            ProtocolError::EmptyArray => "empty RESP command array",
            ProtocolError::BadType => "unexpected RESP type",
            ProtocolError::MissingCrlf => "missing CRLF after bulk string",
            ProtocolError::TooLarge => "command exceeds max payload",
            ProtocolError::InvalidUtf8 => "inline command is not valid UTF-8",
        })
    }
}

impl std::error::Error for ProtocolError {}

/// Decodes the first command in `buf`.
///
/// `max_payload` bounds one whole command in bytes, framing included (`*`, lengths, CRLFs);
/// exceeding it is [`ProtocolError::TooLarge`] as soon as a lower bound of the command's size
/// exceeds it (a `$1000000` header fails at once, without waiting for the data). Note that
/// server.py never enforces `LIVELOCK_MAX_PAYLOAD` (it stores it and never reads it); client.py
/// refuses to *send* a packed command when `len(payload) > max_payload + 1`, so a server that
/// must accept everything a Python client with the same setting sends should pass
/// `LIVELOCK_MAX_PAYLOAD + 1` here.
///
/// Inline lines (server.py: `c + readuntil(b'\r\n')`, `decode()`, `split(' ')`, `strip()`):
/// - the line ends at the first `\r\n` *after its first byte*; a bare `\n` does not end it;
/// - parts are split on single spaces, so consecutive/leading/trailing spaces yield empty
///   parts (`AQ  x` is `["AQ", "", "x"]`, `AQ x \r\n` is `["AQ", "x", ""]`);
/// - each part is stripped of Python whitespace (`str.isspace`: ASCII `\t\n\v\f\r`,
///   `\x1c`-`\x1f`, space, and Unicode spaces such as U+00A0 or U+3000) at both ends;
/// - the line must be valid UTF-8.
///
/// RESP: lengths are plain decimal digits; bulk data must be followed by `\r\n`. Stricter than
/// server.py, which also takes `int()`-parsable headers (`$ 3`, `$+3`, `$0_3`), `\n\n` after a
/// bulk, and nested / integer / null elements (answered `-2` for verbs that validate their
/// arguments); all of those are errors here.
pub fn decode(buf: &[u8], max_payload: usize) -> Result<Decoded<'_>, ProtocolError> {
    match buf.first() {
        None => Ok(Decoded::Incomplete),
        Some(b'*') => decode_array(buf, max_payload),
        Some(b'$') => decode_top_bulk(buf, max_payload),
        Some(b':') | Some(b',') => Err(ProtocolError::BadType),
        Some(_) => decode_inline(buf, max_payload),
    }
}

/// Smallest possible bulk string element: `$0\r\n\r\n`.
const MIN_BULK: usize = 6;

/// Parses the `<digits>\r\n` header whose type byte is at `buf[at]`.
///
/// The whole command is known to take at least `header_end + value * unit + extra` bytes;
/// [`ProtocolError::TooLarge`] is returned as soon as that bound exceeds `max_payload`.
/// Returns `Ok(None)` when more bytes are needed, else `(value, header_end)`.
fn parse_header(
    buf: &[u8],
    at: usize,
    max_payload: usize,
    unit: usize,
    extra: usize,
) -> Result<Option<(usize, usize)>, ProtocolError> {
    let mut i = at + 1;
    let mut value: usize = 0;
    loop {
        // Lower bound of the command size if the header ended right here.
        let bound = i
            .saturating_add(2)
            .saturating_add(value.saturating_mul(unit))
            .saturating_add(extra);
        if bound > max_payload {
            return Err(ProtocolError::TooLarge);
        }
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        match b {
            b'0'..=b'9' => {
                value = value
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(usize::from(b - b'0')))
                    .ok_or(ProtocolError::TooLarge)?;
                i += 1;
            }
            b'-' if i == at + 1 => return Err(ProtocolError::NegativeLength),
            b'\r' if i > at + 1 => {
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((value, i + 2))),
                    Some(_) => Err(ProtocolError::BadLength),
                };
            }
            _ => return Err(ProtocolError::BadLength),
        }
    }
}

/// Parses the bulk string whose `$` is at `buf[at]`; `extra` is the minimum number of bytes
/// still to come after it. Returns the data and the offset just past its CRLF.
fn parse_bulk(
    buf: &[u8],
    at: usize,
    max_payload: usize,
    extra: usize,
) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let Some((len, start)) = parse_header(buf, at, max_payload, 1, extra.saturating_add(2))? else {
        return Ok(None);
    };
    let end = start.checked_add(len).ok_or(ProtocolError::TooLarge)?;
    match buf.get(end) {
        None => Ok(None),
        Some(b'\r') => match buf.get(end + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some((&buf[start..end], end + 2))),
            Some(_) => Err(ProtocolError::MissingCrlf),
        },
        Some(_) => Err(ProtocolError::MissingCrlf),
    }
}

fn decode_array(buf: &[u8], max_payload: usize) -> Result<Decoded<'_>, ProtocolError> {
    let Some((count, mut pos)) = parse_header(buf, 0, max_payload, MIN_BULK, 0)? else {
        return Ok(Decoded::Incomplete);
    };
    if count == 0 {
        return Err(ProtocolError::EmptyArray);
    }
    let mut args = Args::default();
    for k in 0..count {
        match buf.get(pos) {
            None => return Ok(Decoded::Incomplete),
            Some(b'$') => {}
            Some(b':' | b',') => {
                // A RESP integer or double (the Python client packs numbers
                // so): an argument, but not a string, so the command answers
                // -2 and the connection goes on (as with server.py).
                let window = &buf[..buf.len().min(max_payload)];
                let line = window.get(pos + 1..).unwrap_or_default();
                let Some(cr) = line.windows(2).position(|w| w == b"\r\n") else {
                    return if buf.len() >= max_payload {
                        Err(ProtocolError::TooLarge)
                    } else {
                        Ok(Decoded::Incomplete)
                    };
                };
                let end = pos + 1 + cr;
                args.push_non_text(&buf[pos + 1..end]);
                pos = end + 2;
                continue;
            }
            Some(_) => return Err(ProtocolError::BadType),
        }
        let rest = (count - k - 1).saturating_mul(MIN_BULK);
        let Some((data, next)) = parse_bulk(buf, pos, max_payload, rest)? else {
            return Ok(Decoded::Incomplete);
        };
        args.push(data);
        pos = next;
    }
    Ok(Decoded::Command {
        consumed: pos,
        args,
    })
}

fn decode_top_bulk(buf: &[u8], max_payload: usize) -> Result<Decoded<'_>, ProtocolError> {
    let Some((data, consumed)) = parse_bulk(buf, 0, max_payload, 0)? else {
        return Ok(Decoded::Incomplete);
    };
    Ok(Decoded::Command {
        consumed,
        args: Args::from_parts(&[data]),
    })
}

fn decode_inline(buf: &[u8], max_payload: usize) -> Result<Decoded<'_>, ProtocolError> {
    // Only a CRLF whose `\n` lies within the first `max_payload` bytes can end a line that fits.
    let window = &buf[..buf.len().min(max_payload)];
    // server.py reads the first byte, then `readuntil(b'\r\n')`: the CR may not be byte 0.
    let cr = window
        .windows(2)
        .skip(1)
        .position(|w| w == b"\r\n")
        .map(|p| p + 1);
    let Some(cr) = cr else {
        return if buf.len() >= max_payload {
            Err(ProtocolError::TooLarge)
        } else {
            Ok(Decoded::Incomplete)
        };
    };
    let consumed = cr + 2;
    let line = std::str::from_utf8(&buf[..consumed]).map_err(|_| ProtocolError::InvalidUtf8)?;
    let mut args = Args::default();
    for part in line.split(' ') {
        args.push(part.trim_matches(is_py_space).as_bytes());
    }
    Ok(Decoded::Command { consumed, args })
}

/// Python's `str.isspace()` (the set `str.strip()` removes).
fn is_py_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\x1c'..='\x1f'
            | ' '
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// A parsed LiveLock command; every argument is non-empty.
///
/// Arguments of CONN (when present), CONNINFO, AQ, AQR, RELEASE, LOCKED, SIG* and FIND are valid
/// UTF-8 (server.py stores them as `str`). Signals are *not* lowercased here: see
/// [`lowercase_signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    Pass(&'a [u8]),
    Conn(Option<&'a [u8]>),
    ConnInfo(&'a [u8]),
    Aq(&'a [u8]),
    Aqr(&'a [u8]),
    Release(&'a [u8]),
    Locked(&'a [u8]),
    SigSet(&'a [u8], &'a [u8]),
    SigExists(&'a [u8], &'a [u8]),
    SigDel(&'a [u8], &'a [u8]),
    Ping,
    Find(&'a [u8]),
    Stats,
    Shutdown,
}

/// A known verb, recognised whatever its arguments ([`lookup_verb`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Pass,
    Conn,
    ConnInfo,
    Aq,
    Aqr,
    Release,
    Locked,
    SigSet,
    SigExists,
    SigDel,
    Ping,
    Find,
    Stats,
    Shutdown,
    /// server.py's hidden debug verb: only when `LIVELOCK_DEBUG` is set (to any non-empty
    /// string, even "0"), `DUMP` (any arguments) dumps the storage and replies `+1`. Otherwise it
    /// is an unknown command; [`parse_command`] always reports it as unknown.
    Dump,
}

/// Error codes and messages (`shared.ERRORS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    ConnRequired = 1,
    WrongArgs = 2,
    AlreadyHasClientId = 3,
    UnknownCommand = 4,
    WrongPassword = 5,
    RespProtocol = 6,
    ServerError = 7,
    KeyNotExists = 8,
    ServerTerminating = 9,
}

impl ErrorCode {
    /// The numeric code sent on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The message exactly as in `shared.ERRORS` (including its grammar).
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::ConnRequired => "CONN required first",
            ErrorCode::WrongArgs => "Wrong number of arguments",
            ErrorCode::AlreadyHasClientId => "Already has client id",
            ErrorCode::UnknownCommand => "Unknown command",
            ErrorCode::WrongPassword => "Wrong or no password",
            ErrorCode::RespProtocol => "RESP protocol error",
            ErrorCode::ServerError => "Server error",
            ErrorCode::KeyNotExists => "Key does not exists",
            ErrorCode::ServerTerminating => "Server terminating",
        }
    }
}

/// Looks a verb up like server.py's `command.decode().lower()`: ASCII case-insensitive, and
/// U+212A KELVIN SIGN counts as `k` (the only non-ASCII character that Python lowercases to an
/// ASCII letter). No allocation.
pub fn lookup_verb(verb: &[u8]) -> Option<Verb> {
    const KELVIN: &[u8] = "\u{212A}".as_bytes();
    let mut lower = [0u8; 9];
    let mut n = 0;
    let mut i = 0;
    while i < verb.len() {
        let (b, width) = if verb[i].is_ascii() {
            (verb[i].to_ascii_lowercase(), 1)
        } else if verb[i..].starts_with(KELVIN) {
            (b'k', KELVIN.len())
        } else {
            return None;
        };
        *lower.get_mut(n)? = b;
        n += 1;
        i += width;
    }
    Some(match &lower[..n] {
        b"pass" => Verb::Pass,
        b"conn" => Verb::Conn,
        b"conninfo" => Verb::ConnInfo,
        b"aq" => Verb::Aq,
        b"aqr" => Verb::Aqr,
        b"release" => Verb::Release,
        b"locked" => Verb::Locked,
        b"sigset" => Verb::SigSet,
        b"sigexists" => Verb::SigExists,
        b"sigdel" => Verb::SigDel,
        b"ping" => Verb::Ping,
        b"find" => Verb::Find,
        b"stats" => Verb::Stats,
        b"shutdown" => Verb::Shutdown,
        b"dump" => Verb::Dump,
        _ => return None,
    })
}

/// A non-empty, UTF-8 argument, as server.py's `if ... not args[0]` plus `args[0].decode()`
/// inside `try: ... except: WRONG_ARGS`.
fn text_arg(arg: Option<&[u8]>) -> Result<&[u8], ErrorCode> {
    match arg {
        Some(a) if !a.is_empty() && std::str::from_utf8(a).is_ok() => Ok(a),
        _ => Err(ErrorCode::WrongArgs),
    }
}

/// Verb lookup (case-insensitive, see [`lookup_verb`]; no allocation) and argument checks,
/// exactly as server.py's `process_command`:
///
/// | verb | accepted arguments | otherwise |
/// |---|---|---|
/// | PASS | exactly 1, non-empty | `Err(WrongPassword)` |
/// | CONN | none, or a non-empty UTF-8 first one (extra arguments ignored) | `Err(WrongArgs)` |
/// | CONNINFO, AQ, AQR, RELEASE, LOCKED, FIND | exactly 1, non-empty UTF-8 | `Err(WrongArgs)` |
/// | SIGSET, SIGEXISTS, SIGDEL | exactly 2, non-empty UTF-8 | `Err(WrongArgs)` |
/// | PING, SHUTDOWN | anything (arguments ignored) | -- |
/// | STATS | none | `Err(WrongArgs)` |
/// | anything else (incl. the empty verb, DUMP, a whole command in one bulk string) | | `Err(UnknownCommand)` |
///
/// (server.py crashes the connection's reader instead of replying for a non-UTF-8 verb, CONN id
/// or FIND pattern; here those are `UnknownCommand` / `WrongArgs`.)
///
/// The caller must apply server.py's state checks *before* using these errors, in this order
/// (use [`lookup_verb`] on `args.get(0)` to know the verb when parsing failed):
/// 0. Server terminating: every command gets `-9 Server terminating`.
/// 1. A password is set (non-empty `LIVELOCK_PASSWORD`) and the connection is not authorized:
///    `Ok(Pass(p))` with `p` equal to the password -> `+1`, authorized. Anything else (wrong
///    password, `Err(WrongPassword)`, any other verb, unknown or malformed) -> `-5 Wrong or no
///    password` and close the connection (server.py then keeps executing what is already
///    buffered with its replies dropped; don't copy that).
/// 2. Verb CONN, with or without a client id: if the connection already has a client id,
///    first reply `-3 Already has client id` and go on anyway (server.py sends *two* replies).
///    Then `Err(WrongArgs)` -> `-2`; `Conn(Some(id))` -> adopt `id`, restore its locks, become
///    its latest connection, reply `+<id>`; `Conn(None)` -> new uuid4 id, become its latest
///    connection, reply `+<uuid>`.
/// 3. Any other verb (even unknown, malformed, PASS) without a client id -> `-1 CONN required
///    first`.
/// 4. With a client id: `Err(code)` -> that code; PASS when it was not needed (no password or
///    already authorized; `Ok(Pass(_))` or `Err(WrongPassword)`) -> `-4 Unknown command`;
///    SHUTDOWN unless `LIVELOCK_SHUTDOWN_SUPPORT` -> `-4`; DUMP with `LIVELOCK_DEBUG` -> `+1`.
pub fn parse_command<'a>(args: &Args<'a>) -> Result<Command<'a>, ErrorCode> {
    let verb = args.get(0).ok_or(ErrorCode::UnknownCommand)?;
    let argc = args.len() - 1;
    let text = |i: usize| match args.is_text(i) {
        true => text_arg(args.get(i)),
        false => Err(ErrorCode::WrongArgs),
    };
    let one = || {
        if argc == 1 {
            text(1)
        } else {
            Err(ErrorCode::WrongArgs)
        }
    };
    let two = || {
        if argc == 2 {
            Ok((text(1)?, text(2)?))
        } else {
            Err(ErrorCode::WrongArgs)
        }
    };
    Ok(match lookup_verb(verb).ok_or(ErrorCode::UnknownCommand)? {
        Verb::Pass => match args.get(1) {
            Some(p) if argc == 1 && !p.is_empty() && args.is_text(1) => Command::Pass(p),
            _ => return Err(ErrorCode::WrongPassword),
        },
        Verb::Conn => {
            if argc == 0 {
                Command::Conn(None)
            } else {
                Command::Conn(Some(text(1)?))
            }
        }
        Verb::ConnInfo => Command::ConnInfo(one()?),
        Verb::Aq => Command::Aq(one()?),
        Verb::Aqr => Command::Aqr(one()?),
        Verb::Release => Command::Release(one()?),
        Verb::Locked => Command::Locked(one()?),
        Verb::SigSet => {
            let (lock, signal) = two()?;
            Command::SigSet(lock, signal)
        }
        Verb::SigExists => {
            let (lock, signal) = two()?;
            Command::SigExists(lock, signal)
        }
        Verb::SigDel => {
            let (lock, signal) = two()?;
            Command::SigDel(lock, signal)
        }
        Verb::Ping => Command::Ping,
        Verb::Find => Command::Find(one()?),
        Verb::Stats => {
            if argc != 0 {
                return Err(ErrorCode::WrongArgs);
            }
            Command::Stats
        }
        Verb::Shutdown => Command::Shutdown,
        Verb::Dump => return Err(ErrorCode::UnknownCommand),
    })
}

/// Lowercases a signal name as server.py does (`signal.lower()`, full Unicode lowercasing,
/// e.g. `CANCEL` -> `cancel`, `ΑΣ` -> `ας`). Returns `sig` itself when it is already lowercase
/// ASCII (no copy); otherwise writes the lowercased bytes into `scratch` (cleared first) and
/// returns them. Non-UTF-8 input (rejected by [`parse_command`]) is ASCII-lowercased.
pub fn lowercase_signal<'s>(sig: &'s [u8], scratch: &'s mut Vec<u8>) -> &'s [u8] {
    if sig.is_ascii() && !sig.iter().any(u8::is_ascii_uppercase) {
        return sig;
    }
    scratch.clear();
    match std::str::from_utf8(sig) {
        Ok(s) if !s.is_ascii() => scratch.extend_from_slice(s.to_lowercase().as_bytes()),
        _ => scratch.extend(sig.iter().map(u8::to_ascii_lowercase)),
    }
    scratch
}

/// Appends `+<text>\r\n` (server.py `_reply(str)`: PONG, client ids).
pub fn encode_simple(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'+');
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

/// Appends `+1\r\n` or `+0\r\n` (server.py `_reply(True/False)`).
pub fn encode_bool(out: &mut Vec<u8>, v: bool) {
    out.extend_from_slice(if v { b"+1\r\n" } else { b"+0\r\n" });
}

/// Appends `-<code> <message>\r\n` (server.py `_reply(int)`), e.g. `-4 Unknown command\r\n`.
pub fn encode_error(out: &mut Vec<u8>, code: ErrorCode) {
    out.push(b'-');
    push_u64(out, u64::from(code.code()));
    out.push(b' ');
    out.extend_from_slice(code.message().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends the FIND reply for `items` (lock id, acquire time in unix seconds):
/// [`encode_find_header`] then [`encode_find_item`] for each.
pub fn encode_find(out: &mut Vec<u8>, items: &[(&[u8], f64)]) {
    encode_find_header(out, items.len());
    for &(id, time) in items {
        encode_find_item(out, id, time);
    }
}

/// Appends `*<count>\r\n`, the start of a FIND reply with `count` items (lets a caller stream
/// items without collecting them).
pub fn encode_find_header(out: &mut Vec<u8>, count: usize) {
    out.push(b'*');
    push_u64(out, count as u64);
    out.extend_from_slice(b"\r\n");
}

/// Appends one FIND item, `*2\r\n$<len>\r\n<id>\r\n,<time>\r\n`, with the time formatted as
/// Python's `repr(float)` (see [`push_py_float`]).
pub fn encode_find_item(out: &mut Vec<u8>, id: &[u8], time: f64) {
    out.extend_from_slice(b"*2\r\n");
    push_blob(out, id);
    push_double(out, time);
}

/// A STATS value, encoded as `shared.pack_resp` encodes the Python type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatValue<'a> {
    /// Python `int`: `:<n>\r\n`.
    Int(i64),
    /// Python `float`: `,<repr>\r\n`.
    Float(f64),
    /// Python `str`: `$<utf-8 len>\r\n<text>\r\n`.
    Str(&'a str),
}

/// Appends a RESP3 map `%<n>\r\n` then, per entry, the key as a blob string
/// `$<len>\r\n<key>\r\n` and the value (see [`StatValue`]), exactly as `shared._pack_dict`.
pub fn encode_map(out: &mut Vec<u8>, entries: &[(&str, StatValue<'_>)]) {
    out.push(b'%');
    push_u64(out, entries.len() as u64);
    out.extend_from_slice(b"\r\n");
    for (key, value) in entries {
        push_blob(out, key.as_bytes());
        match *value {
            StatValue::Int(n) => {
                out.push(b':');
                if n < 0 {
                    out.push(b'-');
                }
                push_u64(out, n.unsigned_abs());
                out.extend_from_slice(b"\r\n");
            }
            StatValue::Float(v) => push_double(out, v),
            StatValue::Str(s) => push_blob(out, s.as_bytes()),
        }
    }
}

/// `$<len>\r\n<data>\r\n` (`shared._pack_blob_str`).
fn push_blob(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'$');
    push_u64(out, data.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// `,<repr>\r\n` (`shared._pack_float`).
fn push_double(out: &mut Vec<u8>, v: f64) {
    out.push(b',');
    push_py_float(out, v);
    out.extend_from_slice(b"\r\n");
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A fixed-size `fmt::Write` sink, to format a float without allocating.
struct StackBuf {
    buf: [u8; 40],
    len: usize,
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// False when `v`'s exact decimal expansion has more than 18 significant digits, so no two
/// candidates of at most 17 digits can be equally close to it (the case where Rust's shortest
/// `{:e}` may differ from Python's). Typical timestamps (`time.time()`) take this fast path.
fn tie_possible(v: f64) -> bool {
    let bits = v.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let mut mantissa = bits & ((1u64 << 52) - 1);
    let mut exp = if biased == 0 {
        -1074
    } else {
        mantissa |= 1 << 52;
        biased - 1075
    };
    if mantissa == 0 || exp >= 0 {
        return true; // zero, or an integer: take the exact path
    }
    let zeros = mantissa.trailing_zeros();
    mantissa >>= zeros;
    exp += zeros as i32;
    if exp >= 0 {
        return true;
    }
    // v = mantissa / 2^-exp = mantissa * 5^-exp / 10^-exp: its significant digits are those of
    // mantissa * 5^-exp, at least floor(log10(mantissa) + -exp * log10(5)) + 1. A 0.5 margin
    // covers the float error of this estimate.
    (mantissa as f64).log10() + f64::from(-exp) * std::f64::consts::LOG10_2.mul_add(-1.0, 1.0)
        < 18.5
}

/// Appends `v` formatted exactly as Python's `str(float)` / `repr(float)`: the shortest digits
/// that round-trip; positional notation with at least one fractional digit (`5.0`,
/// `1700000000.1234567`, `0.0001`) when the decimal exponent is in `-4..16`, otherwise
/// scientific with a signed, at least two-digit exponent (`1e-05`, `1e+16`,
/// `1.7976931348623157e+308`); `inf`, `-inf`, `nan`, `-0.0`.
pub fn push_py_float(out: &mut Vec<u8>, v: f64) {
    use fmt::Write as _;
    if v.is_nan() {
        out.extend_from_slice(b"nan");
        return;
    }
    if v.is_infinite() {
        out.extend_from_slice(if v > 0.0 { b"inf" } else { b"-inf" });
        return;
    }
    // Rust's `{:e}` gives the shortest round-trip digits (`-1.2345e-7`, `5e0`, `-0e0`), but
    // when two candidates of that length round-trip it does not always pick the one Python's
    // dtoa picks (the nearest, ties to even: 1536836464471698.25 -> ...698.2, not ...698.3).
    // Rust's fixed-precision `{:.*e}` rounds exactly, ties to even: use it at the shortest
    // length whenever it round-trips.
    let mut shortest = StackBuf {
        buf: [0; 40],
        len: 0,
    };
    if write!(shortest, "{v:e}").is_err() {
        return; // unreachable: at most 24 bytes
    }
    let ndigits = shortest.buf[..shortest.len]
        .iter()
        .take_while(|&&b| b != b'e')
        .filter(|b| b.is_ascii_digit())
        .count();
    let mut nearest = StackBuf {
        buf: [0; 40],
        len: 0,
    };
    let use_nearest = tie_possible(v)
        && write!(nearest, "{:.*e}", ndigits.saturating_sub(1), v).is_ok()
        && std::str::from_utf8(&nearest.buf[..nearest.len])
            .ok()
            .and_then(|t| t.parse::<f64>().ok())
            == Some(v);
    let s = if use_nearest { nearest } else { shortest };
    let text = &s.buf[..s.len];
    let (negative, text) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let e_at = text.iter().position(|&b| b == b'e').unwrap_or(text.len());
    let (mantissa, exp_text) = (&text[..e_at], text.get(e_at + 1..).unwrap_or(b""));
    let mut exp: i32 = 0;
    let (exp_negative, exp_digits) = match exp_text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, exp_text),
    };
    for &d in exp_digits {
        exp = exp * 10 + i32::from(d - b'0');
    }
    if exp_negative {
        exp = -exp;
    }
    // Significant digits without the point: "1.2345" -> "12345".
    let mut digits = [0u8; 20];
    let mut ndigits = 0;
    for &d in mantissa.iter().filter(|b| b.is_ascii_digit()) {
        digits[ndigits] = d;
        ndigits += 1;
    }
    let digits = &digits[..ndigits];
    if negative {
        out.push(b'-');
    }
    // Python (`format_float_short`, mode 'r'): decpt = exp + 1; scientific if decpt <= -4 or
    // decpt > 16.
    let decpt = exp + 1;
    if decpt <= -4 || decpt > 16 {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let abs = exp.unsigned_abs();
        if abs < 10 {
            out.push(b'0');
        }
        push_u64(out, u64::from(abs));
    } else if decpt <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat(b'0').take(decpt.unsigned_abs() as usize));
        out.extend_from_slice(digits);
    } else {
        let decpt = decpt as usize;
        if decpt >= digits.len() {
            out.extend_from_slice(digits);
            out.extend(std::iter::repeat(b'0').take(decpt - digits.len()));
            out.extend_from_slice(b".0");
        } else {
            out.extend_from_slice(&digits[..decpt]);
            out.push(b'.');
            out.extend_from_slice(&digits[decpt..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    fn cmd(buf: &[u8]) -> (usize, Vec<Vec<u8>>) {
        match decode(buf, MAX) {
            Ok(Decoded::Command { consumed, args }) => {
                let parts = (0..args.len()).map(|i| args.get(i).unwrap().to_vec());
                (consumed, parts.collect())
            }
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn parts(buf: &[u8]) -> Vec<Vec<u8>> {
        let (consumed, parts) = cmd(buf);
        assert_eq!(consumed, buf.len(), "{:?}", String::from_utf8_lossy(buf));
        parts
    }

    fn v(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    fn err(buf: &[u8]) -> ProtocolError {
        match decode(buf, MAX) {
            Err(e) => e,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn parse(buf: &[u8]) -> Result<Command<'_>, ErrorCode> {
        match decode(buf, MAX).unwrap() {
            Decoded::Command { args, .. } => parse_command(&args),
            other => panic!("{other:?}"),
        }
    }

    fn resp(items: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", items.len()).into_bytes();
        for item in items {
            out.extend_from_slice(format!("${}\r\n", item.len()).as_bytes());
            out.extend_from_slice(item);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    #[test]
    fn resp_array() {
        assert_eq!(parts(b"*2\r\n$2\r\nAQ\r\n$3\r\nfoo\r\n"), v(&["AQ", "foo"]));
        assert_eq!(parts(b"*1\r\n$4\r\nPING\r\n"), v(&["PING"]));
        // Binary-safe: spaces, CR, LF inside a bulk string.
        assert_eq!(
            parts(b"*2\r\n$2\r\naq\r\n$5\r\na b\r\n\r\n"),
            v(&["aq", "a b\r\n"])
        );
        assert_eq!(parts(b"*2\r\n$2\r\nAQ\r\n$0\r\n\r\n"), v(&["AQ", ""]));
        // Leading zeros are plain digits.
        assert_eq!(parts(b"*01\r\n$04\r\nPING\r\n"), v(&["PING"]));
    }

    #[test]
    fn resp_top_level_bulk_is_a_command() {
        // server.py: `if not isinstance(value, list): value = [value, ]`.
        assert_eq!(parts(b"$4\r\nPING\r\n"), v(&["PING"]));
        assert_eq!(parts(b"$0\r\n\r\n"), v(&[""]));
    }

    #[test]
    fn resp_more_than_args_max() {
        let items: Vec<&[u8]> = vec![b"a"; 11];
        let buf = resp(&items);
        match decode(&buf, MAX).unwrap() {
            Decoded::Command { consumed, args } => {
                assert_eq!(consumed, buf.len());
                assert_eq!(args.len(), 11);
                assert_eq!(args.get(ARGS_MAX - 1), Some(&b"a"[..]));
                assert_eq!(args.get(ARGS_MAX), None);
                assert!(!args.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let mut buf = b"*9\r\n$4\r\nPING\r\n".to_vec();
        for _ in 0..8 {
            buf.extend_from_slice(b"$1\r\nx\r\n");
        }
        assert_eq!(parse(&buf), Ok(Command::Ping));
    }

    #[test]
    fn inline() {
        assert_eq!(parts(b"AQ foo\r\n"), v(&["AQ", "foo"]));
        assert_eq!(parts(b"ping\r\n"), v(&["ping"]));
        assert_eq!(parts(b"SIGSET l CANCEL\r\n"), v(&["SIGSET", "l", "CANCEL"]));
        // Split on single spaces: empty parts are kept.
        assert_eq!(parts(b"AQ  foo\r\n"), v(&["AQ", "", "foo"]));
        assert_eq!(parts(b"AQ foo \r\n"), v(&["AQ", "foo", ""]));
        assert_eq!(parts(b" AQ\r\n"), v(&["", "AQ"]));
        assert_eq!(parts(b"CONN \r\n"), v(&["CONN", ""]));
        // Each part is str.strip()ped: tabs, \v, \x1c, NBSP, ideographic space...
        assert_eq!(parts(b"AQ\t foo\t\r\n"), v(&["AQ", "foo"]));
        assert_eq!(parts(b"\x0bAQ\x1c foo\r\n"), v(&["AQ", "foo"]));
        assert_eq!(
            parts("AQ \u{a0}f\u{a0}o\u{3000}\r\n".as_bytes()),
            v(&["AQ", "f\u{a0}o"])
        );
        assert_eq!(parts("AQ \u{2003}é\u{85}\r\n".as_bytes()), v(&["AQ", "é"]));
        // A bare LF does not end a line; it stays inside a part unless at its ends.
        assert_eq!(parts(b"AQ a\nb\r\n"), v(&["AQ", "a\nb"]));
        assert_eq!(parts(b"PING\nPING\r\n"), v(&["PING\nPING"]));
        assert_eq!(parts(b"AQ a\n\r\n"), v(&["AQ", "a"]));
        // Any first byte other than `*$:,` starts an inline line.
        assert_eq!(parts(b"+PING\r\n"), v(&["+PING"]));
        assert_eq!(parts(b"\0\r\n"), v(&["\0"]));
        assert_eq!(parts(b"\r\r\n"), v(&[""]));
    }

    #[test]
    fn inline_empty_line_runs_into_the_next() {
        // server.py reads one byte (`\r`) then `readuntil(b'\r\n')`.
        assert_eq!(decode(b"\r\n", MAX), Ok(Decoded::Incomplete));
        assert_eq!(parts(b"\r\nPING\r\n"), v(&["PING"]));
        assert_eq!(parts(b"\r\nAQ x\r\n"), v(&["AQ", "x"]));
        assert_eq!(parts(b"\r\n\r\n"), v(&[""]));
        assert_eq!(cmd(b"\r\n\r\n\r\n"), (4, v(&[""])));
        assert_eq!(cmd(b"\n\r\nPING\r\n"), (3, v(&[""])));
    }

    #[test]
    fn inline_invalid_utf8() {
        assert_eq!(err(b"AQ \xff\r\n"), ProtocolError::InvalidUtf8);
        assert_eq!(err(b"\xc3\r\n"), ProtocolError::InvalidUtf8);
        // Only the line is checked.
        assert_eq!(cmd(b"PING\r\n\xff"), (6, v(&["PING"])));
    }

    #[test]
    fn pipelined() {
        let mut buf = b"*1\r\n$4\r\nPING\r\nAQ a\r\n$4\r\nPING\r\n".to_vec();
        buf.extend_from_slice(&resp(&[b"RELEASE", b"a"]));
        buf.extend_from_slice(b"LOCKED a\r\nPIN");
        let mut rest = &buf[..];
        let mut seen = Vec::new();
        while let Decoded::Command { consumed, args } = decode(rest, MAX).unwrap() {
            seen.push(parse_command(&args).unwrap());
            rest = &rest[consumed..];
        }
        assert_eq!(
            seen,
            vec![
                Command::Ping,
                Command::Aq(b"a"),
                Command::Ping,
                Command::Release(b"a"),
                Command::Locked(b"a"),
            ]
        );
        assert_eq!(rest, b"PIN");
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let mut cases = vec![
            resp(&[b"AQ", b"foo"]),
            resp(&[b"SIGSET", b"lock", b"CANCEL"]),
            resp(&[b"PING"]),
            resp(&[b"AQ", b""]),
            resp(&[&b"x"[..]; 12]),
            b"$4\r\nPING\r\n".to_vec(),
            b"AQ foo\r\n".to_vec(),
            b"\r\nPING\r\n".to_vec(),
            b"AQ a\nb\r\n".to_vec(),
            "AQ \u{3000}é\r\n".as_bytes().to_vec(),
        ];
        cases.push(resp(&[b"AQ", &[b'z'; 1000]]));
        for case in cases {
            for end in 0..case.len() {
                assert_eq!(
                    decode(&case[..end], MAX),
                    Ok(Decoded::Incomplete),
                    "{:?}",
                    String::from_utf8_lossy(&case[..end])
                );
            }
            assert!(matches!(
                decode(&case, MAX),
                Ok(Decoded::Command { consumed, .. }) if consumed == case.len()
            ));
        }
    }

    #[test]
    fn numbers_are_arguments_but_not_text() {
        for input in [
            &b"*2\r\n$2\r\nAQ\r\n:123\r\n"[..],
            b"*2\r\n$2\r\nAQ\r\n,1.5\r\n",
        ] {
            let Ok(Decoded::Command { consumed, args }) = decode(input, 1024) else {
                panic!("{input:?} decodes");
            };
            assert_eq!(consumed, input.len());
            assert!(args.is_text(0) && !args.is_text(1));
            assert_eq!(parse_command(&args), Err(ErrorCode::WrongArgs));
        }
        let Ok(Decoded::Command { args, .. }) = decode(b"*2\r\n$4\r\nPASS\r\n:1\r\n", 1024) else {
            panic!("decodes");
        };
        assert_eq!(parse_command(&args), Err(ErrorCode::WrongPassword));
        assert!(matches!(
            decode(b"*2\r\n$2\r\nAQ\r\n:12", 1024),
            Ok(Decoded::Incomplete)
        ));
        assert_eq!(
            decode(b"*2\r\n$2\r\nAQ\r\n:1234567890", 16).unwrap_err(),
            ProtocolError::TooLarge
        );
    }

    #[test]
    fn protocol_errors() {
        use ProtocolError::*;
        assert_eq!(err(b"*x\r\n"), BadLength);
        assert_eq!(err(b"*\r\n"), BadLength);
        assert_eq!(err(b"*+1\r\n"), BadLength);
        assert_eq!(err(b"* 1\r\n"), BadLength);
        assert_eq!(err(b"*1 \r\n"), BadLength);
        assert_eq!(err(b"*1\n"), BadLength);
        assert_eq!(err(b"*1\r\r"), BadLength);
        assert_eq!(err(b"*1\r\n$x\r\n"), BadLength);
        assert_eq!(err(b"*1\r\n$\r\n"), BadLength);
        assert_eq!(err(b"$2x"), BadLength);
        assert_eq!(err(b"*-1\r\n"), NegativeLength);
        assert_eq!(err(b"*-"), NegativeLength);
        assert_eq!(err(b"*1\r\n$-1\r\n"), NegativeLength);
        assert_eq!(err(b"$-1\r\n\r\n"), NegativeLength);
        assert_eq!(err(b"*0\r\n"), EmptyArray);
        assert_eq!(err(b"*00\r\n"), EmptyArray);
        assert_eq!(err(b"*1\r\n*1\r\n$4\r\nPING\r\n"), BadType);
        assert_eq!(err(b"*1\r\n+PING\r\n"), BadType);
        assert_eq!(err(b"*1\r\nPING\r\n"), BadType);
        assert_eq!(err(b":1\r\n"), BadType);
        assert_eq!(err(b":"), BadType);
        assert_eq!(err(b",1.5\r\n"), BadType);
        assert_eq!(err(b"*1\r\n$4\r\nPINGxx"), MissingCrlf);
        assert_eq!(err(b"*1\r\n$4\r\nPING\n\n"), MissingCrlf);
        assert_eq!(err(b"*1\r\n$4\r\nPING\rx"), MissingCrlf);
        assert_eq!(err(b"*1\r\n$4\r\nPINGx"), MissingCrlf);
        assert_eq!(err(b"$4\r\nPING\n"), MissingCrlf);
        assert_eq!(err(b"$99999999999999999999999999"), TooLarge);
        assert_eq!(err(b"AQ \xff\r\n"), InvalidUtf8);
        assert!(!TooLarge.to_string().is_empty());
    }

    #[test]
    fn max_payload() {
        let buf = resp(&[b"AQ", b"foo"]); // 21 bytes
        assert_eq!(buf.len(), 21);
        assert!(matches!(
            decode(&buf, 21),
            Ok(Decoded::Command { consumed: 21, .. })
        ));
        assert_eq!(decode(&buf, 20), Err(ProtocolError::TooLarge));
        // Known before the bytes arrive: the bulk length alone is too big...
        assert_eq!(
            decode(b"*2\r\n$2\r\nAQ\r\n$1003\r\n", 1024), // 19 + 1003 + 2 = 1024
            Ok(Decoded::Incomplete)
        );
        assert_eq!(
            decode(b"*2\r\n$2\r\nAQ\r\n$1004\r\n", 1024),
            Err(ProtocolError::TooLarge)
        );
        // ... even before its header is complete ...
        assert_eq!(decode(b"$10000", 1024), Err(ProtocolError::TooLarge));
        assert_eq!(decode(b"*1\r\n$1", 1024), Ok(Decoded::Incomplete));
        // ... or the element count cannot fit (each element takes at least 6 bytes).
        assert_eq!(decode(b"*3\r\n", 22), Ok(Decoded::Incomplete));
        assert_eq!(decode(b"*3\r\n", 21), Err(ProtocolError::TooLarge));
        assert_eq!(decode(b"*200\r\n", 1024), Err(ProtocolError::TooLarge));
        assert_eq!(decode(b"*1\r\n$3\r\nfoo", 10), Err(ProtocolError::TooLarge));
        // Leading zeros still count.
        assert_eq!(decode(b"*000000", 8), Err(ProtocolError::TooLarge));
        assert_eq!(decode(b"*", 0), Err(ProtocolError::TooLarge));
        assert_eq!(decode(b"", 0), Ok(Decoded::Incomplete));
        // Inline: the whole line, CRLF included.
        assert!(matches!(
            decode(b"AQ foo\r\n", 8),
            Ok(Decoded::Command { consumed: 8, .. })
        ));
        assert_eq!(decode(b"AQ foo\r\n", 7), Err(ProtocolError::TooLarge));
        assert_eq!(decode(b"AQ foo\r", 7), Err(ProtocolError::TooLarge));
        assert_eq!(decode(b"AQ foo", 7), Ok(Decoded::Incomplete));
        assert_eq!(decode(b"AQ fooo", 7), Err(ProtocolError::TooLarge));
        assert_eq!(decode(&[b'a'; 2000], 1024), Err(ProtocolError::TooLarge));
        // A huge limit does not overflow.
        assert_eq!(
            decode(b"*99999999999999999999999\r\n", usize::MAX),
            Err(ProtocolError::TooLarge)
        );
        assert_eq!(
            decode(b"*2\r\n$18446744073709551615\r\n", usize::MAX),
            Err(ProtocolError::TooLarge)
        );
        assert_eq!(
            decode(b"*9999999999\r\n$1\r\n", usize::MAX),
            Ok(Decoded::Incomplete)
        );
    }

    #[test]
    fn verbs_case_insensitive() {
        for verb in ["PING", "ping", "Ping", "pInG"] {
            assert_eq!(parse(format!("{verb}\r\n").as_bytes()), Ok(Command::Ping));
            assert_eq!(parse(&resp(&[verb.as_bytes()])), Ok(Command::Ping));
        }
        assert_eq!(parse(b"aQr x\r\n"), Ok(Command::Aqr(b"x")));
        // Python's str.lower() maps KELVIN SIGN to "k".
        assert_eq!(
            parse("LOC\u{212A}ED x\r\n".as_bytes()),
            Ok(Command::Locked(b"x"))
        );
        assert_eq!(lookup_verb("SIGEXISTS".as_bytes()), Some(Verb::SigExists));
        assert_eq!(lookup_verb(b"sigexistss"), None);
        assert_eq!(lookup_verb(b"DUMP"), Some(Verb::Dump));
        assert_eq!(lookup_verb("\u{130}".as_bytes()), None);
        assert_eq!(lookup_verb(b""), None);
    }

    #[test]
    fn commands() {
        use Command::*;
        assert_eq!(parse(b"PASS secret\r\n"), Ok(Pass(b"secret")));
        assert_eq!(parse(b"CONN\r\n"), Ok(Conn(None)));
        assert_eq!(parse(b"CONN id1\r\n"), Ok(Conn(Some(b"id1"))));
        assert_eq!(parse(b"CONN id1 extra args\r\n"), Ok(Conn(Some(b"id1"))));
        assert_eq!(parse(b"CONNINFO host:1\r\n"), Ok(ConnInfo(b"host:1")));
        assert_eq!(parse(b"AQ l\r\n"), Ok(Aq(b"l")));
        assert_eq!(parse(b"AQR l\r\n"), Ok(Aqr(b"l")));
        assert_eq!(parse(b"RELEASE l\r\n"), Ok(Release(b"l")));
        assert_eq!(parse(b"LOCKED l\r\n"), Ok(Locked(b"l")));
        assert_eq!(parse(b"SIGSET l S\r\n"), Ok(SigSet(b"l", b"S")));
        assert_eq!(parse(b"SIGEXISTS l S\r\n"), Ok(SigExists(b"l", b"S")));
        assert_eq!(parse(b"SIGDEL l S\r\n"), Ok(SigDel(b"l", b"S")));
        assert_eq!(parse(b"PING\r\n"), Ok(Ping));
        assert_eq!(parse(b"PING x y\r\n"), Ok(Ping));
        assert_eq!(parse(b"PING \r\n"), Ok(Ping));
        assert_eq!(parse(b"FIND a*\r\n"), Ok(Find(b"a*")));
        assert_eq!(parse(b"STATS\r\n"), Ok(Stats));
        assert_eq!(parse(b"SHUTDOWN\r\n"), Ok(Shutdown));
        assert_eq!(parse(b"SHUTDOWN now\r\n"), Ok(Shutdown));
        assert_eq!(
            parse(&resp(&[b"AQ", "é".as_bytes()])),
            Ok(Aq("é".as_bytes()))
        );
        // Lock ids are binary-safe over RESP (as long as they are UTF-8).
        assert_eq!(parse(&resp(&[b"aq", b"a b\r\n"])), Ok(Aq(b"a b\r\n")));
    }

    #[test]
    fn arity_errors() {
        use ErrorCode::*;
        let wrong: &[&[u8]] = &[
            b"CONN \r\n",
            b"CONN  id\r\n",
            b"CONNINFO\r\n",
            b"CONNINFO a b\r\n",
            b"CONNINFO \r\n",
            b"AQ\r\n",
            b"AQ a b\r\n",
            b"AQ \r\n",
            b"AQ a \r\n",
            b"AQR\r\n",
            b"AQR a b\r\n",
            b"RELEASE\r\n",
            b"RELEASE a b\r\n",
            b"LOCKED\r\n",
            b"LOCKED a b\r\n",
            b"SIGSET l\r\n",
            b"SIGSET l s x\r\n",
            b"SIGSET  l s\r\n",
            b"SIGEXISTS l\r\n",
            b"SIGEXISTS l s x\r\n",
            b"SIGDEL l\r\n",
            b"SIGDEL l s x\r\n",
            b"FIND\r\n",
            b"FIND a b\r\n",
            b"FIND \r\n",
            b"STATS x\r\n",
            b"STATS \r\n",
        ];
        for line in wrong {
            assert_eq!(
                parse(line),
                Err(WrongArgs),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        for items in [
            &[&b"AQ"[..], b""][..],
            &[b"CONN", b""],
            &[b"SIGSET", b"l", b""],
            &[b"SIGDEL", b"", b"s"],
            &[b"AQ", b"\xff"],
            &[b"CONN", b"\xff"],
            &[b"CONNINFO", b"\xc3"],
            &[b"SIGEXISTS", b"l", b"\xff"],
            &[b"FIND", b"\xff"],
        ] {
            assert_eq!(parse(&resp(items)), Err(WrongArgs), "{items:?}");
        }
        // PASS never yields -2: in every state it is -5, -1 or -4.
        assert_eq!(parse(b"PASS\r\n"), Err(WrongPassword));
        assert_eq!(parse(b"PASS a b\r\n"), Err(WrongPassword));
        assert_eq!(parse(b"PASS \r\n"), Err(WrongPassword));
        assert_eq!(
            parse(&resp(&[b"PASS", b"\xff"])),
            Ok(Command::Pass(b"\xff"))
        );
    }

    #[test]
    fn unknown_commands() {
        use ErrorCode::UnknownCommand;
        assert_eq!(parse(b"NOPE\r\n"), Err(UnknownCommand));
        assert_eq!(parse(b"DUMP\r\n"), Err(UnknownCommand));
        assert_eq!(parse(b"\r\n\r\n"), Err(UnknownCommand));
        assert_eq!(parse(b" PING\r\n"), Err(UnknownCommand));
    }

    #[test]
    fn whole_command_in_one_bulk_is_unknown() {
        assert_eq!(
            parse(b"*1\r\n$7\r\nAQ lock\r\n"),
            Err(ErrorCode::UnknownCommand)
        );
        assert_eq!(parse(b"$7\r\nAQ lock\r\n"), Err(ErrorCode::UnknownCommand));
        // RESP verbs are not stripped.
        assert_eq!(
            parse(b"*1\r\n$5\r\nPING \r\n"),
            Err(ErrorCode::UnknownCommand)
        );
        assert_eq!(parse(&resp(&[b"\xff"])), Err(ErrorCode::UnknownCommand));
        assert_eq!(
            parse_command(&Args::default()),
            Err(ErrorCode::UnknownCommand)
        );
    }

    #[test]
    fn signal_lowercasing() {
        let mut scratch = Vec::new();
        assert_eq!(lowercase_signal(b"cancel", &mut scratch), b"cancel");
        assert!(scratch.is_empty()); // no copy when already lowercase
        assert_eq!(lowercase_signal(b"CanCEL", &mut scratch), b"cancel");
        assert_eq!(
            lowercase_signal("ÄÖ".as_bytes(), &mut scratch),
            "äö".as_bytes()
        );
        // Python: 'ΑΣ'.lower() == 'ας' (final sigma), 'İ'.lower() == 'i̇'.
        assert_eq!(
            lowercase_signal("ΑΣ".as_bytes(), &mut scratch),
            "ας".as_bytes()
        );
        assert_eq!(
            lowercase_signal("\u{130}".as_bytes(), &mut scratch),
            "i\u{307}".as_bytes()
        );
        assert_eq!(lowercase_signal(b"A\xff", &mut scratch), b"a\xff");
    }

    #[test]
    fn encode_simple_and_bool() {
        // server.py `_reply`: payload = '%s%s\r\n' % (prefix, content); True -> '1', False -> '0'.
        let mut out = Vec::new();
        encode_simple(&mut out, b"PONG");
        encode_bool(&mut out, true);
        encode_bool(&mut out, false);
        encode_simple(&mut out, b"0b7e1a86-05a1-4b3e-9c1e-2f8c2b0a1d3e");
        assert_eq!(
            out,
            b"+PONG\r\n+1\r\n+0\r\n+0b7e1a86-05a1-4b3e-9c1e-2f8c2b0a1d3e\r\n"
        );
    }

    #[test]
    fn encode_errors() {
        // server.py `_reply(int)`: content = '%s %s' % (content, ERRORS[content]); prefix = '-'.
        use ErrorCode::*;
        let expected: [(ErrorCode, &[u8]); 9] = [
            (ConnRequired, b"-1 CONN required first\r\n"),
            (WrongArgs, b"-2 Wrong number of arguments\r\n"),
            (AlreadyHasClientId, b"-3 Already has client id\r\n"),
            (UnknownCommand, b"-4 Unknown command\r\n"),
            (WrongPassword, b"-5 Wrong or no password\r\n"),
            (RespProtocol, b"-6 RESP protocol error\r\n"),
            (ServerError, b"-7 Server error\r\n"),
            (KeyNotExists, b"-8 Key does not exists\r\n"),
            (ServerTerminating, b"-9 Server terminating\r\n"),
        ];
        for (code, bytes) in expected {
            let mut out = Vec::new();
            encode_error(&mut out, code);
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn encode_find_bytes() {
        // server.py: self._reply_data(list(self.adaptor.find(...))) with items
        // (lock_id: str, time.time(): float); shared._pack_array / _pack_blob_str /
        // _pack_float: b','+str(value).encode()+b'\r\n'.
        let mut out = Vec::new();
        encode_find(&mut out, &[]);
        assert_eq!(out, b"*0\r\n");
        out.clear();
        encode_find(
            &mut out,
            &[
                (b"lock1", 1636000000.123456),
                ("é".as_bytes(), 1700000000.0),
            ],
        );
        assert_eq!(
            out,
            "*2\r\n*2\r\n$5\r\nlock1\r\n,1636000000.123456\r\n*2\r\n$2\r\né\r\n,1700000000.0\r\n"
                .as_bytes()
        );
    }

    #[test]
    fn encode_stats_bytes() {
        // InMemoryLockStorage.stats(): dict(lock_count=len(self.all_locks),
        //     dump_file_path=os.path.abspath(self._dump_file_name))
        // shared._pack_dict: b'%' + str(len) + b'\r\n', then pack_resp(k), pack_resp(v).
        let mut out = Vec::new();
        encode_map(
            &mut out,
            &[
                ("lock_count", StatValue::Int(3)),
                (
                    "dump_file_path",
                    StatValue::Str("/data/livelock_memstor_dump.pickle"),
                ),
            ],
        );
        assert_eq!(
            out,
            &b"%2\r\n$10\r\nlock_count\r\n:3\r\n$14\r\ndump_file_path\r\n\
               $34\r\n/data/livelock_memstor_dump.pickle\r\n"[..]
        );
        out.clear();
        encode_map(
            &mut out,
            &[("n", StatValue::Int(-12)), ("f", StatValue::Float(0.5))],
        );
        assert_eq!(out, b"%2\r\n$1\r\nn\r\n:-12\r\n$1\r\nf\r\n,0.5\r\n");
        out.clear();
        encode_map(&mut out, &[]);
        assert_eq!(out, b"%0\r\n");
        out.clear();
        encode_map(&mut out, &[("m", StatValue::Int(i64::MIN))]);
        assert_eq!(out, b"%1\r\n$1\r\nm\r\n:-9223372036854775808\r\n");
    }

    #[test]
    fn python_float_repr() {
        // Expected values are Python 3.11 repr() output.
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (5.0, "5.0"),
            (0.5, "0.5"),
            (-2.5, "-2.5"),
            (0.1, "0.1"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (1700000000.1234567, "1700000000.1234567"),
            (1636000000.123456, "1636000000.123456"),
            (1636000000.5, "1636000000.5"),
            (1e22, "1e+22"),
            (1e100, "1e+100"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
            (9999999999999998.0, "9999999999999998.0"),
            (0.3, "0.3"),
            (2.0 / 3.0, "0.6666666666666666"),
            // Ties between two shortest candidates go to the even digit, like Python's dtoa.
            (1536836464471698.0 + 0.25, "1536836464471698.2"), // exact tie
            (9146122297214.0 + 0.0625, "9146122297214.062"),
            (1e23, "1e+23"),
        ];
        // Timestamps skip the tie check; exact ties do not.
        assert!(!tie_possible(1700000000.1234567));
        assert!(tie_possible(1536836464471698.0 + 0.25));
        assert!(tie_possible(0.5));
        for &(value, text) in cases {
            let mut out = Vec::new();
            push_py_float(&mut out, value);
            assert_eq!(String::from_utf8(out).unwrap(), text, "{value:e}");
        }
    }
}
