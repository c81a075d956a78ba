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
    /// `etcd://`: etcd's lock API with a lease, over its HTTP/JSON gateway.
    Etcd,
}

impl Proto {
    pub fn scheme(self) -> &'static str {
        match self {
            Proto::Native => "livelock",
            Proto::LiveLockResp => "livelock-resp",
            Proto::Redis => "redis",
            Proto::Etcd => "etcd",
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

/// Splits a target into the protocol and `host:port`. A target without a
/// scheme is a livelock server in the one address syntax of every
/// `livelock` command (`HOST`, `HOST:PORT`, `[::1]:PORT`); the port defaults
/// to the scheme's (7873 for livelock, 6379 for redis). A trailing `/` is
/// accepted; any other path, user info or query is refused.
pub fn parse_url(url: &str) -> Result<(Proto, String), String> {
    let (proto, rest) = match url.split_once("://") {
        None => (Proto::Native, url),
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "livelock" => (Proto::Native, rest),
            "livelock-resp" => (Proto::LiveLockResp, rest),
            "redis" => (Proto::Redis, rest),
            "etcd" => (Proto::Etcd, rest),
            other => {
                return Err(format!(
                "unknown scheme {other:?} in {url:?}: use livelock, livelock-resp, redis or etcd"
            ))
            }
        },
    };
    let default_port = match proto {
        Proto::Redis => 6379,
        Proto::Etcd => 2379,
        Proto::Native | Proto::LiveLockResp => livelock::address::DEFAULT_PORT,
    };
    let mut list = livelock::address::parse_list(rest, default_port)
        .map_err(|e| format!("target {url:?}: {e}"))?;
    if list.len() != 1 {
        return Err(format!("target {url:?}: one server, not a list"));
    }
    Ok((proto, list.remove(0)))
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
    let authority = authority.as_str();
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
        let ok = |proto, authority: &str| Ok((proto, authority.to_string()));
        assert_eq!(
            parse_url("livelock://127.0.0.1:7873"),
            ok(Proto::Native, "127.0.0.1:7873")
        );
        assert_eq!(
            parse_url("livelock-resp://localhost:1/"),
            ok(Proto::LiveLockResp, "localhost:1")
        );
        assert_eq!(
            parse_url("REDIS://[::1]:6379"),
            ok(Proto::Redis, "[::1]:6379")
        );
        // The address forms of every livelock command; default ports.
        assert_eq!(parse_url("127.0.0.1"), ok(Proto::Native, "127.0.0.1:7873"));
        assert_eq!(parse_url("::1"), ok(Proto::Native, "[::1]:7873"));
        assert_eq!(
            parse_url("livelock://localhost"),
            ok(Proto::Native, "localhost:7873")
        );
        assert_eq!(
            parse_url("redis://127.0.0.1"),
            ok(Proto::Redis, "127.0.0.1:6379")
        );
        for bad in [
            "http://127.0.0.1:80",
            "a:1,b:2",
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
