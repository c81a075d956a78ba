//! What to drive: a URL naming the protocol and the address, resolved and
//! checked (loopback only unless the operator says otherwise).

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

/// The protocol spoken to the target, chosen by the URL scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// `livelock://`: the native binary protocol (HELLO, ACQUIRE, RELEASE, PING).
    Native,
    /// `livelock-resp://`: the LiveLock text protocol (RESP arrays: CONN, AQ, RELEASE, PING).
    LiveLockResp,
    /// `redis://`: Redis locks (SET NX PX + compare-and-delete via EVALSHA).
    Redis,
}

impl Proto {
    pub fn scheme(self) -> &'static str {
        match self {
            Proto::Native => "livelock",
            Proto::LiveLockResp => "livelock-resp",
            Proto::Redis => "redis",
        }
    }

    /// Replies come back in the order the requests were sent (RESP), rather
    /// than matched by request id (native).
    pub fn in_order(self) -> bool {
        self != Proto::Native
    }
}

/// A parsed, resolved target.
#[derive(Debug, Clone)]
pub struct Target {
    pub proto: Proto,
    /// `HOST:PORT` as written in the URL.
    pub authority: String,
    /// Every address the host resolved to; connections use the first.
    pub addrs: Vec<SocketAddr>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.proto.scheme(), self.authority)
    }
}

/// Splits `scheme://host:port` into the protocol and `host:port`. A trailing
/// `/` is accepted; any other path, user info or query is refused.
pub fn parse_url(url: &str) -> Result<(Proto, &str), String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("target {url:?} is not a URL: expected livelock://HOST:PORT, livelock-resp://HOST:PORT or redis://HOST:PORT")
    })?;
    let proto = match scheme.to_ascii_lowercase().as_str() {
        "livelock" => Proto::Native,
        "livelock-resp" => Proto::LiveLockResp,
        "redis" => Proto::Redis,
        other => {
            return Err(format!(
                "unknown scheme {other:?} in {url:?}: use livelock, livelock-resp or redis"
            ))
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return Err(format!(
            "target {url:?} must be {scheme}://HOST:PORT with no path, user or query"
        ));
    }
    let port_ok = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(format!(
            "target {url:?} needs a host and a port, e.g. {scheme}://127.0.0.1:7873"
        ));
    }
    Ok((proto, authority))
}

/// Why a target cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    /// The URL is malformed or the address is refused (a usage error).
    Bad(String),
    /// The host name does not resolve (the target cannot be reached).
    Unresolved(String),
}

/// Parses and resolves `url`. Refuses a host that resolves to anything but
/// loopback addresses unless `allow_remote`.
pub fn resolve(url: &str, allow_remote: bool) -> Result<Target, TargetError> {
    let (proto, authority) = parse_url(url).map_err(TargetError::Bad)?;
    let addrs: Vec<SocketAddr> = authority
        .to_socket_addrs()
        .map_err(|e| TargetError::Unresolved(format!("cannot resolve {authority}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(TargetError::Unresolved(format!(
            "{authority} resolved to no address"
        )));
    }
    if !allow_remote {
        if let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(TargetError::Bad(format!(
                "refusing to load a non-loopback target {url} ({remote}): a load test can \
                 swamp a shared server. Pass --allow-remote if you mean it"
            )));
        }
    }
    Ok(Target {
        proto,
        authority: authority.to_string(),
        addrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schemes_and_authorities() {
        assert_eq!(
            parse_url("livelock://127.0.0.1:7873"),
            Ok((Proto::Native, "127.0.0.1:7873"))
        );
        assert_eq!(
            parse_url("livelock-resp://localhost:1/"),
            Ok((Proto::LiveLockResp, "localhost:1"))
        );
        assert_eq!(
            parse_url("REDIS://[::1]:6379"),
            Ok((Proto::Redis, "[::1]:6379"))
        );
        for bad in [
            "127.0.0.1:7873",
            "http://127.0.0.1:80",
            "redis://127.0.0.1",
            "redis://127.0.0.1:0",
            "redis://:6379",
            "redis://127.0.0.1:6379/0",
            "redis://user@127.0.0.1:6379",
            "livelock://",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_only_unless_allowed() {
        assert!(resolve("livelock://127.0.0.1:7873", false).is_ok());
        assert!(resolve("livelock://[::1]:7873", false).is_ok());
        match resolve("livelock://10.1.2.3:7873", false) {
            Err(TargetError::Bad(e)) => assert!(e.contains("--allow-remote"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(resolve("livelock://10.1.2.3:7873", true).is_ok());
    }
}
