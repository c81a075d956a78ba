//! `livelock list | inspect | signal | stats | release --force |
//! kill-session`: operator commands over the native protocol, as human
//! tables or `--json` for scripts. Ages are computed from the server's
//! clock, which every reply carries.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use livelock::client::{Client, ClientOptions, Error, Inspection, LockRecord, ServerStats};
use livelock::protocol::{ClusterChange, ClusterReply, Mode, Status};

#[derive(Args)]
pub struct AdminArgs {
    /// Server(s): HOST, HOST:PORT or livelock://HOST:PORT, comma-separated to try in order [default: LIVELOCK_HOST, LIVELOCK_PORT, else 127.0.0.1:7873]
    #[arg(long, value_name = "ADDR[,ADDR...]")]
    server: Option<String>,
    /// Password for the server.
    #[arg(long, env = "LIVELOCK_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Print JSON instead of a table (fencing tokens and session ids as strings: they pass 2^53).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

/// How a command reaches a server over TLS (shared by every client command).
#[derive(Args, Clone)]
pub struct TlsArgs {
    /// Speak TLS, trusting this CA (PEM) for the server's certificate.
    #[arg(long, env = "LIVELOCK_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate chain (PEM), for a server that asks for one (mutual TLS).
    #[arg(long = "tls-cert", env = "LIVELOCK_TLS_CLIENT_CERT", value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(
        long = "tls-key",
        env = "LIVELOCK_TLS_CLIENT_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry [default: the host of the address].
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The TLS setup for the server at `addr` (HOST:PORT), if TLS is asked for.
    fn client(&self, addr: &str) -> Result<Option<livelock::client::TlsClient>, String> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let name = self
            .tls_server_name
            .as_deref()
            .unwrap_or(host.trim_start_matches('[').trim_end_matches(']'));
        let client_cert = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        livelock::client::TlsClient::new(ca, name, client_cert).map(Some)
    }
}

/// What to do (parsed by main.rs, which owns the clap definitions).
pub enum AdminCommand {
    List {
        pattern: String,
        limit: u32,
    },
    Inspect {
        name: String,
    },
    Signal {
        name: String,
        signal: String,
    },
    Stats,
    Report {
        top: u32,
        /// A tag filter (tags text); empty: every name.
        tag: String,
    },
    /// End other sessions' holds of a lock (every hold, or the one with `token`).
    ForceRelease {
        name: String,
        token: Option<u64>,
    },
    KillSession {
        session: u64,
    },
    ClusterStatus,
    ClusterChange(livelock::protocol::ClusterChange),
}

/// The servers to try: `--server`, else LIVELOCK_HOST/LIVELOCK_PORT, else
/// 127.0.0.1:7873 (`livelock::address`); a bad address is a usage error.
pub fn servers(flag: &Option<String>) -> Result<Vec<String>, String> {
    livelock::address::servers_from_env(flag.as_deref())
}

/// How to reach each of `servers`: `base` with each one's TLS setup, all
/// loaded before any is dialled (a file that does not load is a usage
/// error).
pub fn server_options(
    servers: &[String],
    base: &ClientOptions,
    tls: &TlsArgs,
) -> Result<Vec<ClientOptions>, String> {
    servers
        .iter()
        .map(|addr| {
            Ok(ClientOptions {
                tls: tls.client(addr)?,
                ..base.clone()
            })
        })
        .collect()
}

/// Opens a session on the first of `servers` that answers, in order, each
/// with its `options` (a refused password stops the search: the others
/// share it). Returns the client, its address and the options that reached
/// it; on failure, the last address tried and its error.
pub fn connect_first<'a>(
    servers: &'a [String],
    options: &'a [ClientOptions],
) -> Result<(Client, &'a str, &'a ClientOptions), (&'a str, Error)> {
    let mut last = None;
    for (addr, options) in servers.iter().zip(options) {
        match Client::connect(addr.as_str(), options) {
            Ok(client) => return Ok((client, addr, options)),
            Err(e @ Error::Status(Status::Auth, _)) => return Err((addr, e)),
            Err(e) => last = Some((addr.as_str(), e)),
        }
    }
    Err(last.expect("at least one server"))
}

pub fn run(args: AdminArgs, command: AdminCommand) -> ExitCode {
    if let AdminCommand::List { pattern, .. } = &command {
        if let Some(problem) = livelock::glob::Glob::new(pattern.as_bytes()).problem() {
            eprintln!("livelock: invalid glob {pattern:?}: {problem}");
            return ExitCode::from(2);
        }
    }
    let servers = match servers(&args.server) {
        Ok(servers) => servers,
        Err(e) => {
            eprintln!("livelock: {e}");
            return ExitCode::from(2);
        }
    };
    let base = ClientOptions {
        password: args.password.clone(),
        ..ClientOptions::default()
    };
    let options = match server_options(&servers, &base, &args.tls) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("livelock: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match connect_first(&servers, &options) {
        Ok((client, _, _)) => client,
        Err((addr, e)) => {
            eprintln!("livelock: cannot open a session at {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match command {
        AdminCommand::List { pattern, limit } => client.list(&pattern, limit).map(|listing| {
            if args.json {
                let items: Vec<String> = listing.records.iter().map(record_json).collect();
                println!(
                    "{{\"locks\":[{}],\"truncated\":{},\"server_unix_ms\":{}}}",
                    items.join(","),
                    listing.truncated,
                    listing.server_unix_ms
                );
            } else {
                print_table(&listing.records, listing.server_unix_ms);
                if listing.truncated {
                    println!("(list cut at {} locks)", listing.records.len());
                }
            }
        }),
        AdminCommand::Inspect { name } => {
            client.inspect(&name).map(|found| match (found, args.json) {
                (Some(found), true) => println!("{}", inspection_json(&found)),
                (Some(found), false) => print_inspection(&found),
                (None, true) => println!("null"),
                (None, false) => println!("{name} is not held"),
            })
        }
        AdminCommand::Signal { name, signal } => match client.signal(&name, &signal) {
            Ok(()) => {
                if args.json {
                    println!("{{\"signalled\":true}}");
                } else {
                    println!("signalled {signal} on {name}");
                }
                Ok(())
            }
            // A signal goes to a lock's holders: there are none.
            Err(Error::Status(Status::NotHeld, _)) => {
                eprintln!("livelock: {name} is not held by anyone: nobody to signal");
                let _ = client.bye();
                return ExitCode::from(1);
            }
            Err(e) => Err(e),
        },
        AdminCommand::ClusterChange(change) => match client.cluster_change(&change) {
            // A transfer ends the old leader, maybe before its answer
            // left: whether the change is done, the cluster tells.
            Ok(()) | Err(Error::Disconnected) => {
                let reconnect = || connect_first(&servers, &options).ok().map(|(c, _, _)| c);
                return wait_for_change(Some(client), &change, args.json, reconnect);
            }
            Err(e) => Err(e),
        },
        AdminCommand::ClusterStatus => client.cluster_status().map(|status| match args.json {
            true => println!("{}", cluster_json(&status)),
            false => print_cluster(&status),
        }),
        AdminCommand::Report { top, tag } => {
            client
                .report_tagged(top, tag.as_bytes())
                .map(|report| match args.json {
                    true => println!("{}", report_json(&report, !tag.is_empty())),
                    false => print_report(&report, !tag.is_empty()),
                })
        }
        AdminCommand::Stats => client.stats().map(|stats| match args.json {
            true => println!("{}", stats_json(&stats)),
            false => print_stats(&stats),
        }),
        AdminCommand::ForceRelease { name, token } => {
            match client.force_release(&name, token.unwrap_or(0)) {
                Ok(()) => {
                    match (args.json, token) {
                        (true, _) => println!("{{\"released\":true}}"),
                        (false, Some(token)) => println!(
                            "released {name} (token {token}); its holder was told LOCK_LOST"
                        ),
                        (false, None) => {
                            println!("released {name}; its holders were told LOCK_LOST")
                        }
                    }
                    Ok(())
                }
                Err(Error::Status(status @ (Status::NotHeld | Status::WrongToken), _)) => {
                    match status {
                        Status::NotHeld => {
                            eprintln!("livelock: {name} is not held by anyone: nothing to release")
                        }
                        _ => eprintln!(
                            "livelock: no hold of {name} has token {}: nothing released",
                            token.unwrap_or(0)
                        ),
                    }
                    let _ = client.bye();
                    return ExitCode::from(1);
                }
                Err(e) => Err(e),
            }
        }
        AdminCommand::KillSession { session } => match client.kill_session(session) {
            Ok(()) => {
                match args.json {
                    true => println!("{{\"killed\":true}}"),
                    false => println!("ended session {session}; its locks are released"),
                }
                Ok(())
            }
            Err(Error::Status(Status::UnknownSession, _)) => {
                eprintln!("livelock: there is no session {session} (ended already, or never was)");
                let _ = client.bye();
                return ExitCode::from(1);
            }
            Err(e) => Err(e),
        },
    };
    let _ = client.bye();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livelock: {e}");
            ExitCode::from(1)
        }
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Exclusive => "exclusive",
        Mode::Shared => "shared",
        Mode::Permits => "permits",
    }
}

/// The MODE column of a hold: the mode, or a semaphore's permits as
/// WEIGHT/CAPACITY.
fn hold_mode(record: &LockRecord, weight: u32) -> String {
    match record.mode {
        Mode::Permits => format!("{weight}/{}", record.capacity),
        mode => mode_name(mode).to_string(),
    }
}

/// How long ago `since_unix_ms` was, by the server's clock `now_unix_ms`.
fn age(since_unix_ms: u64, now_unix_ms: u64) -> Duration {
    Duration::from_millis(now_unix_ms.saturating_sub(since_unix_ms))
}

fn print_table(records: &[LockRecord], now_unix_ms: u64) {
    // As wide as the longest name, so the columns stay aligned.
    let width = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.name).chars().count())
        .max()
        .unwrap_or(0)
        .max(32);
    println!(
        "{:<width$} {:<9} {:>7} {:>20} {:>10}  CLIENT",
        "NAME", "MODE", "WAITERS", "TOKEN", "HELD FOR"
    );
    for record in records {
        for (i, holder) in record.holders.iter().enumerate() {
            let name = if i == 0 {
                String::from_utf8_lossy(&record.name).into_owned()
            } else {
                String::new()
            };
            let waiters = if i == 0 {
                record.waiters.to_string()
            } else {
                String::new()
            };
            println!(
                "{:<width$} {:<9} {:>7} {:>20} {:>10}  {}",
                name,
                hold_mode(record, holder.weight),
                waiters,
                holder.token,
                livelock::duration::human(age(holder.since_unix_ms, now_unix_ms)),
                String::from_utf8_lossy(&holder.client_name)
            );
        }
        if !record.signals.is_empty() {
            let signals: Vec<String> = record
                .signals
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            println!("{:<width$} signals: {}", "", signals.join(", "));
        }
    }
}

/// INSPECT as a table: the holders, then who waits, first in line first.
fn print_inspection(found: &Inspection) {
    print_table(std::slice::from_ref(&found.record), found.server_unix_ms);
    if found.queue.is_empty() {
        return;
    }
    println!();
    println!(
        "{:>4} {:>20} {:<9} {:>13}  CLIENT",
        "#", "WAITING SESSION", "MODE", "WAITING FOR"
    );
    for (place, waiting) in found.queue.iter().enumerate() {
        println!(
            "{:>4} {:>20} {:<9} {:>13}  {}",
            place + 1,
            waiting.session,
            mode_name(waiting.mode),
            livelock::duration::human(age(waiting.since_unix_ms, found.server_unix_ms)),
            String::from_utf8_lossy(&waiting.client_name)
        );
    }
    if found.queue_cut {
        println!("(queue cut at {} waiters)", found.queue.len());
    }
}

fn print_stats(stats: &ServerStats) {
    let uptime = livelock::duration::human(Duration::from_millis(stats.uptime_ms));
    for (label, value) in [
        ("version", stats.version.clone()),
        ("uptime", uptime),
        ("locks held", stats.locks.to_string()),
        ("waiters", stats.waiters.to_string()),
        ("sessions attached", stats.sessions_attached.to_string()),
        ("sessions detached", stats.sessions_detached.to_string()),
        ("connections", stats.connections.to_string()),
        ("acquires total", stats.acquisitions_total.to_string()),
        ("grants total", stats.grants_total.to_string()),
        ("releases total", stats.releases_total.to_string()),
        ("timeouts total", stats.timeouts_total.to_string()),
        ("busy total", stats.busy_total.to_string()),
        ("locks lost total", stats.locks_lost_total.to_string()),
        ("connections total", stats.connections_total.to_string()),
    ] {
        println!("{label:<19}{value}");
    }
}

/// How long `cluster add/remove/transfer` waits for the change to be done.
const CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits (bounded) until the cluster shows `change` done: members added and
/// caught up, removed, or the leader moved. Exit 0 done, 1 not in time.
fn wait_for_change(
    client: Option<Client>,
    change: &ClusterChange,
    json: bool,
    reconnect: impl Fn() -> Option<Client>,
) -> ExitCode {
    use livelock::protocol::MemberChange;
    let started = std::time::Instant::now();
    let mut last = None;
    let mut client = client;
    while started.elapsed() < CHANGE_WAIT {
        // A transfer or a removal may end the old leader, and this
        // connection with it: then it connects again.
        let status = match client.as_ref().map(Client::cluster_status) {
            Some(Ok(status)) => Some(status),
            _ => {
                client = reconnect();
                None
            }
        };
        if let Some(status) = status {
            let has = |id: u64| status.members.iter().find(|m| m.id == id);
            let done = match change {
                ClusterChange::Transfer(id) => status.node == *id,
                ClusterChange::Members(changes) => changes.iter().all(|c| match c {
                    MemberChange::Add { id, .. } => {
                        has(*id).is_some_and(|m| m.active && lag(&status, m.matched) == 0)
                    }
                    MemberChange::Remove { id } => has(*id).is_none(),
                }),
            };
            if done {
                match json {
                    true => println!("{}", cluster_json(&status)),
                    false => print_cluster(&status),
                }
                return ExitCode::SUCCESS;
            }
            last = Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!(
        "livelock: the change was proposed but is not done after {}; see `livelock cluster status`",
        livelock::duration::human(started.elapsed())
    );
    if let Some(status) = last {
        print_cluster(&status);
    }
    ExitCode::from(1)
}

/// A member's replication state as raft names it.
fn member_state(state: u8) -> &'static str {
    match state {
        0 => "probe",
        1 => "replicate",
        _ => "snapshot",
    }
}

/// How far a member is behind the leader's log.
fn lag(status: &ClusterReply, matched: u64) -> u64 {
    let last = status
        .members
        .iter()
        .find(|m| m.id == status.node)
        .map_or(0, |m| m.matched);
    last.saturating_sub(matched)
}

fn print_cluster(status: &ClusterReply) {
    if status.node == 0 {
        println!("not a cluster: a single server");
        return;
    }
    let leader = status.members.iter().find(|m| m.id == status.node);
    let addr = leader.map_or("", |m| m.client_addr.as_str());
    println!(
        "leader   node {} ({addr}), term {}",
        status.node, status.term
    );
    println!("commit   {}, applied {}", status.commit, status.applied);
    println!(
        "{:<8}{:<24}{:>12}{:>8}  {:<11}HEALTH",
        "MEMBER", "CLIENT", "MATCHED", "LAG", "STATE"
    );
    for member in &status.members {
        println!(
            "{:<8}{:<24}{:>12}{:>8}  {:<11}{}",
            member.id,
            member.client_addr,
            member.matched,
            lag(status, member.matched),
            member_state(member.state),
            match member.active {
                true => "up",
                false => "unreachable",
            }
        );
    }
}

fn cluster_json(status: &ClusterReply) -> String {
    if status.node == 0 {
        return "{\"cluster\":false}".into();
    }
    let members: Vec<String> = status
        .members
        .iter()
        .map(|m| {
            format!(
                "{{\"id\":{},\"client\":{},\"matched\":{},\"lag\":{},\"state\":\"{}\",\"healthy\":{}}}",
                m.id,
                json_string(m.client_addr.as_bytes()),
                m.matched,
                lag(status, m.matched),
                member_state(m.state),
                m.active
            )
        })
        .collect();
    format!(
        "{{\"cluster\":true,\"leader\":{},\"term\":{},\"commit\":{},\"applied\":{},\"members\":[{}]}}",
        status.node,
        status.term,
        status.commit,
        status.applied,
        members.join(",")
    )
}

/// `tagged`: the first row is the tag filter's total.
fn print_report(report: &livelock::protocol::Report, tagged: bool) {
    let shown = |i: usize, name: &[u8]| match (tagged, i) {
        (true, 0) => format!("TOTAL {}", String::from_utf8_lossy(name)),
        _ => String::from_utf8_lossy(name).into_owned(),
    };
    let width = report
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| shown(i, &r.name).chars().count())
        .max()
        .unwrap_or(0)
        .max(24);
    println!(
        "{:<width$} {:>5} {:>7} {:>9} {:>9} {:>7} {:>8}  {:>17}  {:>17}",
        "NAME",
        "HELD",
        "WAITING",
        "ACQUIRES",
        "GRANTS",
        "BUSY",
        "TIMEOUTS",
        "WAIT p50/p99/max",
        "HOLD p50/p99/max"
    );
    let times = |t: &[u32; 3]| format!("{}/{}/{} ms", t[0], t[1], t[2]);
    for (i, row) in report.rows.iter().enumerate() {
        println!(
            "{:<width$} {:>5} {:>7} {:>9} {:>9} {:>7} {:>8}  {:>17}  {:>17}",
            shown(i, &row.name),
            row.held,
            row.waiting,
            row.acquires,
            row.grants,
            row.busy,
            row.timeouts,
            times(&row.wait_ms),
            times(&row.hold_ms)
        );
    }
}

/// `tagged`: the first row is the tag filter's total (`"total"`).
fn report_json(report: &livelock::protocol::Report, tagged: bool) -> String {
    let mut rows: Vec<String> = report
        .rows
        .iter()
        .map(|r| {
            format!(
                "{{\"name\":{},\"held\":{},\"waiting\":{},\"acquires\":{},\"grants\":{},\"busy\":{},\"timeouts\":{},\"wait_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"hold_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}}}}",
                json_string(&r.name),
                r.held,
                r.waiting,
                r.acquires,
                r.grants,
                r.busy,
                r.timeouts,
                r.wait_ms[0],
                r.wait_ms[1],
                r.wait_ms[2],
                r.hold_ms[0],
                r.hold_ms[1],
                r.hold_ms[2]
            )
        })
        .collect();
    let total = match tagged && !rows.is_empty() {
        true => format!(",\"total\":{}", rows.remove(0)),
        false => String::new(),
    };
    format!(
        "{{\"server_unix_ms\":{}{total},\"locks\":[{}]}}",
        report.server_unix_ms,
        rows.join(",")
    )
}

fn stats_json(stats: &ServerStats) -> String {
    format!(
        "{{\"version\":{},\"uptime_ms\":{},\"server_unix_ms\":{},\"locks\":{},\"waiters\":{},\
         \"sessions_attached\":{},\"sessions_detached\":{},\"connections\":{},\
         \"acquires_total\":{},\"grants_total\":{},\"releases_total\":{},\"timeouts_total\":{},\
         \"busy_total\":{},\"locks_lost_total\":{},\"connections_total\":{}}}",
        json_string(stats.version.as_bytes()),
        stats.uptime_ms,
        stats.server_unix_ms,
        stats.locks,
        stats.waiters,
        stats.sessions_attached,
        stats.sessions_detached,
        stats.connections,
        stats.acquisitions_total,
        stats.grants_total,
        stats.releases_total,
        stats.timeouts_total,
        stats.busy_total,
        stats.locks_lost_total,
        stats.connections_total
    )
}

fn json_string(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn record_json(record: &LockRecord) -> String {
    let holders: Vec<String> = record
        .holders
        .iter()
        .map(|h| {
            format!(
                "{{\"session\":\"{}\",\"token\":\"{}\",\"since_unix_ms\":{},\"client\":{},\"weight\":{}}}",
                h.session,
                h.token,
                h.since_unix_ms,
                json_string(&h.client_name),
                h.weight
            )
        })
        .collect();
    let signals: Vec<String> = record.signals.iter().map(|s| json_string(s)).collect();
    format!(
        "{{\"name\":{},\"mode\":\"{}\",\"capacity\":{},\"waiters\":{},\"holders\":[{}],\"signals\":[{}]}}",
        json_string(&record.name),
        mode_name(record.mode),
        record.capacity,
        record.waiters,
        holders.join(","),
        signals.join(",")
    )
}

/// INSPECT as JSON: the lock record, the server's clock, and `queue`
/// (session ids as strings, like tokens: they pass 2^53).
fn inspection_json(found: &Inspection) -> String {
    let record = record_json(&found.record);
    let queue: Vec<String> = found
        .queue
        .iter()
        .map(|w| {
            format!(
                "{{\"session\":\"{}\",\"mode\":\"{}\",\"since_unix_ms\":{},\"client\":{},\"weight\":{}}}",
                w.session,
                mode_name(w.mode),
                w.since_unix_ms,
                json_string(&w.client_name),
                w.weight
            )
        })
        .collect();
    format!(
        "{},\"queue\":[{}],\"queue_cut\":{},\"server_unix_ms\":{}}}",
        record.strip_suffix('}').expect("an object"),
        queue.join(","),
        found.queue_cut,
        found.server_unix_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string(b"a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
