//! The one address syntax of every client-side command and the load
//! generator: `HOST`, `HOST:PORT`, `livelock://HOST[:PORT]`, IPv6 as `::1`
//! or `[::1]:PORT`, and a comma-separated list of those (the servers to try,
//! in order); the port defaults to 7873. With no address given, the
//! environment's `LIVELOCK_HOST` (the same syntax) and `LIVELOCK_PORT` (the
//! default port) are read the same way everywhere. Pure parsing, no I/O.

/// The port of a server when none is given.
pub const DEFAULT_PORT: u16 = 7873;

/// `text` as a list of `HOST:PORT` strings (IPv6 hosts in brackets), each
/// without a port getting `default_port`.
pub fn parse_list(text: &str, default_port: u16) -> Result<Vec<String>, String> {
    let list: Vec<String> = text
        .split(',')
        .map(|one| parse_one(one.trim(), default_port))
        .collect::<Result<_, _>>()?;
    Ok(list)
}

fn parse_one(text: &str, default_port: u16) -> Result<String, String> {
    let bad = |why: &str| {
        format!("{text:?} is not a server address ({why}; e.g. HOST, HOST:PORT, livelock://HOST:PORT, [::1]:7873)")
    };
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("livelock") => rest,
        Some((scheme, _)) => return Err(bad(&format!("unknown scheme {scheme:?}"))),
        None => text,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err(bad("no host"));
    }
    if rest.contains(['/', '@', '?', '#', ' ']) {
        return Err(bad("no path, user or query"));
    }
    let port = |p: &str| match p.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(bad(&format!("{p:?} is not a port"))),
    };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("a [ never closed"))?;
        match after {
            "" => (host, default_port),
            _ => (
                host,
                port(after.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?)?,
            ),
        }
    } else if rest.matches(':').count() > 1 {
        // A bare IPv6 address: no port (it would be ambiguous).
        (rest, default_port)
    } else {
        match rest.split_once(':') {
            Some((host, p)) => (host, port(p)?),
            None => (rest, default_port),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    })
}

/// The servers to try: `flag` if given, else `LIVELOCK_HOST` and
/// `LIVELOCK_PORT` (values from `env`), else 127.0.0.1:7873. An error names
/// where the bad value came from.
pub fn servers(
    flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, String> {
    let default_port = match env("LIVELOCK_PORT") {
        Some(text) => match text.trim().parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("LIVELOCK_PORT={text:?} is not a port")),
        },
        None => DEFAULT_PORT,
    };
    match (flag, env("LIVELOCK_HOST")) {
        (Some(flag), _) => parse_list(flag, default_port).map_err(|e| format!("--server: {e}")),
        (None, Some(host)) => {
            parse_list(&host, default_port).map_err(|e| format!("LIVELOCK_HOST: {e}"))
        }
        (None, None) => Ok(vec![format!("127.0.0.1:{default_port}")]),
    }
}

/// `servers` with the process environment.
pub fn servers_from_env(flag: Option<&str>) -> Result<Vec<String>, String> {
    servers(flag, |name| std::env::var(name).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Result<String, String> {
        parse_list(text, DEFAULT_PORT).map(|list| list.join(","))
    }

    #[test]
    fn every_form_reads_the_same() {
        for text in [
            "127.0.0.1",
            "127.0.0.1:7873",
            "livelock://127.0.0.1",
            "livelock://127.0.0.1:7873",
            "LIVELOCK://127.0.0.1:7873/",
        ] {
            assert_eq!(one(text).as_deref(), Ok("127.0.0.1:7873"), "{text}");
        }
        assert_eq!(one("localhost:9000").as_deref(), Ok("localhost:9000"));
        assert_eq!(one("::1").as_deref(), Ok("[::1]:7873"));
        assert_eq!(one("[::1]").as_deref(), Ok("[::1]:7873"));
        assert_eq!(one("livelock://[::1]:9").as_deref(), Ok("[::1]:9"));
        assert_eq!(
            one("a:1, livelock://b ,c").as_deref(),
            Ok("a:1,b:7873,c:7873")
        );
    }

    #[test]
    fn bad_addresses_say_why() {
        for (text, why) in [
            ("", "no host"),
            (":7873", "no host"),
            ("host:0", "not a port"),
            ("host:http", "not a port"),
            ("redis://host", "unknown scheme"),
            ("livelock://host/path", "no path"),
            ("[::1", "never closed"),
            ("a,,b", "no host"),
        ] {
            let error = one(text).unwrap_err();
            assert!(error.contains(why), "{text:?}: {error}");
        }
    }

    #[test]
    fn the_environment_is_read_the_same_way() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(servers(None, env(&[])).unwrap(), ["127.0.0.1:7873"]);
        assert_eq!(
            servers(None, env(&[("LIVELOCK_PORT", "9000")])).unwrap(),
            ["127.0.0.1:9000"]
        );
        assert_eq!(
            servers(
                None,
                env(&[("LIVELOCK_HOST", "h1,h2:1"), ("LIVELOCK_PORT", "9")])
            )
            .unwrap(),
            ["h1:9", "h2:1"]
        );
        assert_eq!(
            servers(Some("x"), env(&[("LIVELOCK_HOST", "h")])).unwrap(),
            ["x:7873"]
        );
        let error = servers(None, env(&[("LIVELOCK_PORT", "abc")])).unwrap_err();
        assert!(error.contains("LIVELOCK_PORT"), "{error}");
        let error = servers(None, env(&[("LIVELOCK_HOST", "h:x")])).unwrap_err();
        assert!(error.contains("LIVELOCK_HOST"), "{error}");
    }
}
