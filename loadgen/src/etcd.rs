//! etcd's lock API through its HTTP/JSON gateway (`etcd://HOST:PORT`):
//! each connection grants one lease (`POST /v3/lease/grant`), then a
//! lock cycle is `POST /v3/lock/lock {name, lease}` — which waits in etcd
//! until the lock is free and answers the key that holds it — and
//! `POST /v3/lock/unlock {key}`. Requests are HTTP/1.1, pipelined on one
//! keep-alive connection; replies come back in order. Bytes in the JSON
//! bodies are base64 (the gateway's encoding of protobuf `bytes`).

use base64::Engine as _;

/// The lease every lock of a connection is taken under, in seconds: longer
/// than any run (the connection's locks go with it when it closes).
pub const LEASE_TTL_SECS: u64 = 3600;

fn post(out: &mut Vec<u8>, host: &str, path: &str, body: &str) {
    out.extend_from_slice(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

/// The lease grant that opens a connection.
pub fn encode_grant(out: &mut Vec<u8>, host: &str) {
    post(
        out,
        host,
        "/v3/lease/grant",
        &format!("{{\"TTL\":{LEASE_TTL_SECS}}}"),
    );
}

/// Lock `name` under `lease` (the decimal id the grant answered).
pub fn encode_lock(out: &mut Vec<u8>, host: &str, name: &[u8], lease: &str) {
    let name = base64::engine::general_purpose::STANDARD.encode(name);
    post(
        out,
        host,
        "/v3/lock/lock",
        &format!("{{\"name\":\"{name}\",\"lease\":\"{lease}\"}}"),
    );
}

/// Unlock by the key `encode_lock`'s answer named (base64, as answered).
pub fn encode_unlock(out: &mut Vec<u8>, host: &str, key: &str) {
    post(
        out,
        host,
        "/v3/lock/unlock",
        &format!("{{\"key\":\"{key}\"}}"),
    );
}

/// A liveness request (`--op ping`).
pub fn encode_health(out: &mut Vec<u8>, host: &str) {
    out.extend_from_slice(format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
}

/// One parsed HTTP response: its status code and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response<'a> {
    pub status: u16,
    pub body: &'a [u8],
}

/// The first complete response in `buf` and the bytes it used; `Ok(None)`
/// if it is not complete yet. Bodies with `Content-Length` or chunked.
pub fn parse(buf: &[u8]) -> Result<Option<(Response<'_>, usize)>, String> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 16 << 10 {
            return Err("an HTTP header over 16 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "a non-UTF-8 HTTP header")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("a bad HTTP status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "a bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let start = head_end + 4;
    if let Some(length) = length {
        if buf.len() < start + length {
            return Ok(None);
        }
        let body = &buf[start..start + length];
        return Ok(Some((Response { status, body }, start + length)));
    }
    if !chunked {
        return Err("an HTTP response with neither Content-Length nor chunks".into());
    }
    // Chunked: the body must be one chunk and the last (what the gateway
    // sends for one JSON message); anything else is refused.
    let rest = &buf[start..];
    let Some(size_end) = rest.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let size = std::str::from_utf8(&rest[..size_end])
        .ok()
        .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
        .ok_or("a bad chunk size")?;
    let body_start = size_end + 2;
    let after = body_start + size + 2;
    if size == 0 {
        // An empty body: "0\r\n\r\n".
        return match rest.len() >= body_start + 2 {
            true => Ok(Some((
                Response { status, body: &[] },
                start + body_start + 2,
            ))),
            false => Ok(None),
        };
    }
    if rest.len() < after + 5 {
        return Ok(None);
    }
    if &rest[after..after + 5] != b"0\r\n\r\n" {
        return Err("a chunked response of more than one chunk".into());
    }
    let body = &rest[body_start..body_start + size];
    Ok(Some((Response { status, body }, start + after + 5)))
}

/// A string field of a JSON object body (`"ID"`, `"key"`); numbers the
/// gateway writes as strings (int64) are strings here too.
pub fn field(body: &[u8], name: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    match value.get(name)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_http_with_base64_names() {
        let mut out = Vec::new();
        encode_lock(&mut out, "127.0.0.1:2379", b"lg-1", "42");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /v3/lock/lock HTTP/1.1\r\n"));
        assert!(text.ends_with("{\"name\":\"bGctMQ==\",\"lease\":\"42\"}"));
        assert!(text.contains("Content-Length: 32\r\n"));
    }

    #[test]
    fn responses_parse_with_length_or_one_chunk() {
        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"ID\":\"7\"}HTTP/1.1";
        let (response, used) = parse(reply).unwrap().unwrap();
        assert_eq!((response.status, used), (200, 49));
        assert_eq!(field(response.body, "ID").as_deref(), Some("7"));
        assert_eq!(parse(&reply[..45]).unwrap(), None, "body incomplete");
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n{\"key\":\"a\"}\r\n0\r\n\r\n";
        let (response, used) = parse(chunked).unwrap().unwrap();
        assert_eq!((response.status, used), (200, chunked.len()));
        assert_eq!(field(response.body, "key").as_deref(), Some("a"));
        assert!(parse(b"HTTP/1.1 xx\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
