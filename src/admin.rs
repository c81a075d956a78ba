//! `livelock list | inspect | signal | stats`: operator commands over the
//! native protocol, as human tables or `--json` for scripts.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

use livelock::client::{Client, ClientOptions, LockRecord};
use livelock::protocol::Mode;

#[derive(Args)]
pub struct AdminArgs {
    /// Server address [default: LIVELOCK_HOST:LIVELOCK_PORT, else 127.0.0.1:7873]
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Password for the server.
    #[arg(long, env = "LIVELOCK_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Print JSON instead of a table (fencing tokens and session ids as strings: they pass 2^53).
    #[arg(long)]
    json: bool,
}

/// What to do (parsed by main.rs, which owns the clap definitions).
pub enum AdminCommand {
    List { pattern: String, limit: u32 },
    Inspect { name: String },
    Signal { name: String, signal: String },
    Stats,
}

pub fn server_addr(server: &Option<String>) -> String {
    if let Some(server) = server {
        return server.clone();
    }
    let host = std::env::var("LIVELOCK_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("LIVELOCK_PORT").unwrap_or_else(|_| "7873".into());
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

pub fn run(args: AdminArgs, command: AdminCommand) -> ExitCode {
    if let AdminCommand::List { pattern, .. } = &command {
        if let Some(problem) = livelock::glob::Glob::new(pattern.as_bytes()).problem() {
            eprintln!("livelock: invalid glob {pattern:?}: {problem}");
            return ExitCode::from(2);
        }
    }
    let addr = server_addr(&args.server);
    let options = ClientOptions {
        password: args.password.clone(),
        ..ClientOptions::default()
    };
    let client = match Client::connect(addr.as_str(), &options) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("livelock: cannot open a session at {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match command {
        AdminCommand::List { pattern, limit } => client.list(&pattern, limit).map(|(records, truncated)| {
            if args.json {
                let items: Vec<String> = records.iter().map(record_json).collect();
                println!("{{\"locks\":[{}],\"truncated\":{truncated}}}", items.join(","));
            } else {
                print_table(&records);
                if truncated {
                    println!("(list cut at {} locks)", records.len());
                }
            }
        }),
        AdminCommand::Inspect { name } => client.inspect(&name).map(|record| match (record, args.json) {
            (Some(record), true) => println!("{}", record_json(&record)),
            (Some(record), false) => print_table(std::slice::from_ref(&record)),
            (None, true) => println!("null"),
            (None, false) => println!("{name} is not held"),
        }),
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
            Err(livelock::client::Error::Status(livelock::protocol::Status::NotHeld, _)) => {
                eprintln!("livelock: {name} is not held by anyone: nobody to signal");
                let _ = client.bye();
                return ExitCode::from(1);
            }
            Err(e) => Err(e),
        },
        AdminCommand::Stats => client.stats().map(|stats| {
            if args.json {
                println!(
                    "{{\"locks\":{},\"waiters\":{},\"sessions_attached\":{},\"sessions_detached\":{},\"connections\":{}}}",
                    stats.locks, stats.waiters, stats.sessions_attached, stats.sessions_detached, stats.connections
                );
            } else {
                println!("locks held         {}", stats.locks);
                println!("waiters            {}", stats.waiters);
                println!("sessions attached  {}", stats.sessions_attached);
                println!("sessions detached  {}", stats.sessions_detached);
                println!("connections        {}", stats.connections);
            }
        }),
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
    }
}

fn age(since_unix_ms: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Duration::from_millis(now.saturating_sub(since_unix_ms))
}

/// An age as people read it: `4.2s`, `4m05s`, `3h02m`, `2d03h`.
fn human_age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..=59 => format!("{:.1}s", age.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

fn print_table(records: &[LockRecord]) {
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
        for (i, (_, token, since, client)) in record.holders.iter().enumerate() {
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
                mode_name(record.mode),
                waiters,
                token,
                human_age(age(*since)),
                String::from_utf8_lossy(client)
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
        .map(|(session, token, since, client)| {
            format!(
                "{{\"session\":\"{session}\",\"token\":\"{token}\",\"since_unix_ms\":{since},\"client\":{}}}",
                json_string(client)
            )
        })
        .collect();
    let signals: Vec<String> = record.signals.iter().map(|s| json_string(s)).collect();
    format!(
        "{{\"name\":{},\"mode\":\"{}\",\"waiters\":{},\"holders\":[{}],\"signals\":[{}]}}",
        json_string(&record.name),
        mode_name(record.mode),
        record.waiters,
        holders.join(","),
        signals.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_people_read_them() {
        let s = Duration::from_secs;
        assert_eq!(human_age(Duration::from_millis(4_200)), "4.2s");
        assert_eq!(human_age(s(245)), "4m05s");
        assert_eq!(human_age(s(3 * 3600 + 2 * 60 + 7)), "3h02m");
        assert_eq!(human_age(s(2 * 86_400 + 3 * 3600)), "2d03h");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string(b"a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
