//! Just enough RESP (the Redis serialization protocol, also spoken by LiveLock)
//! for a load generator: commands out as arrays of bulk strings, replies in.
//!
//! Encoding appends to the caller's buffer; parsing borrows from the read
//! buffer. Neither allocates. An incomplete reply is `Ok(None)`, not an error.

use crate::keys::push_decimal;

/// Appends one command: `*<argc>\r\n` then `$<len>\r\n<arg>\r\n` per argument.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    push_decimal(out, args.len() as u64);
    out.extend_from_slice(b"\r\n");
    for arg in args {
        out.push(b'$');
        push_decimal(out, arg.len() as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// One reply, borrowed from the read buffer. Aggregates are not expected by
/// any command this tool sends; they are reported with their length only and
/// treated as unexpected by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `+text`
    Simple(&'a [u8]),
    /// `-message`
    Error(&'a [u8]),
    /// `:n`
    Int(i64),
    /// `$n` data, or `None` for the nil bulk `$-1`.
    Bulk(Option<&'a [u8]>),
    /// `*n` header (the elements are consumed too); `-1` for a nil array.
    Array(i64),
}

/// The stream is not RESP: the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadReply(pub &'static str);

/// Longest simple string / error / number line accepted.
const LINE_MAX: usize = 64 * 1024;
/// Deepest nesting of arrays accepted (none expected at all).
const DEPTH_MAX: u32 = 4;

/// Parses the reply at the front of `buf`: `Ok(Some((reply, consumed)))`,
/// `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply<'_>, usize)>, BadReply> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], depth: u32) -> Result<Option<(Reply<'_>, usize)>, BadReply> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some(line_end) = find_crlf(&buf[1..]) else {
        if buf.len() > LINE_MAX {
            return Err(BadReply("reply line too long"));
        }
        return Ok(None);
    };
    let line = &buf[1..1 + line_end];
    let after_line = 1 + line_end + 2;
    match kind {
        b'+' => Ok(Some((Reply::Simple(line), after_line))),
        b'-' => Ok(Some((Reply::Error(line), after_line))),
        b':' => Ok(Some((Reply::Int(parse_int(line)?), after_line))),
        b'$' => {
            let len = parse_int(line)?;
            if len == -1 {
                return Ok(Some((Reply::Bulk(None), after_line)));
            }
            let len = usize::try_from(len).map_err(|_| BadReply("bad bulk length"))?;
            let end = after_line + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(BadReply("bulk string not followed by CRLF"));
            }
            Ok(Some((Reply::Bulk(Some(&buf[after_line..end])), end + 2)))
        }
        b'*' => {
            let n = parse_int(line)?;
            if n < -1 {
                return Err(BadReply("bad array length"));
            }
            if depth >= DEPTH_MAX {
                return Err(BadReply("arrays nested too deep"));
            }
            let mut at = after_line;
            for _ in 0..n.max(0) {
                match parse_at(&buf[at..], depth + 1)? {
                    Some((_, used)) => at += used,
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(n), at)))
        }
        _ => Err(BadReply("not a RESP reply")),
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\r') {
        let at = from + i;
        match buf.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

fn parse_int(line: &[u8]) -> Result<i64, BadReply> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(BadReply("bad integer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_bulk_arrays() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"k", b"tok", b"NX", b"PX", b"30000"]);
        assert_eq!(
            out,
            b"*6\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\ntok\r\n$2\r\nNX\r\n$2\r\nPX\r\n$5\r\n30000\r\n"
        );
    }

    #[test]
    fn parses_every_kind() {
        assert_eq!(parse(b"+OK\r\n"), Ok(Some((Reply::Simple(b"OK"), 5))));
        assert_eq!(parse(b"-ERR x\r\n+"), Ok(Some((Reply::Error(b"ERR x"), 8))));
        assert_eq!(parse(b":-12\r\n"), Ok(Some((Reply::Int(-12), 6))));
        assert_eq!(parse(b"$-1\r\n"), Ok(Some((Reply::Bulk(None), 5))));
        assert_eq!(
            parse(b"$4\r\na\r\nb\r\n"),
            Ok(Some((Reply::Bulk(Some(b"a\r\nb")), 10)))
        );
        assert_eq!(
            parse(b"*2\r\n$1\r\na\r\n:1\r\n"),
            Ok(Some((Reply::Array(2), 15)))
        );
        assert_eq!(parse(b"*-1\r\n"), Ok(Some((Reply::Array(-1), 5))));
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let whole = b"$4\r\na\r\nb\r\n";
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse(b"*2\r\n:1\r\n"), Ok(None));
        assert_eq!(parse(b"+OK\r"), Ok(None));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse(b"?\r\n").is_err());
        assert!(parse(b":x\r\n").is_err());
        assert!(parse(b"$-2\r\n").is_err());
        assert!(parse(b"$1\r\nab\r\n").is_err());
        assert!(parse(&vec![b'+'; LINE_MAX + 2]).is_err());
    }
}
