//! `livelock run NAME -- COMMAND`: hold a lock while a command runs.
//!
//! The one promise: COMMAND never runs without the lock. It starts only after
//! the grant; if the hold is lost (lease, connection gone past its grace,
//! session taken) it gets SIGTERM at once and SIGKILL after `--kill-after`;
//! and if `livelock run` itself dies, the kernel kills COMMAND
//! (PR_SET_PDEATHSIG), whose lock the server frees when our socket closes.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use clap::Args;
use crossbeam_channel::{after, never, select};

use livelock::client::{AcquireOptions, Client, ClientOptions, Error, Event};
use livelock::protocol::{Mode, Status};

/// Exit status when the lock was not obtained (EX_TEMPFAIL).
const EXIT_NOT_LOCKED: u8 = 75;
/// Exit status when COMMAND could not be started.
const EXIT_NO_COMMAND: u8 = 127;

#[derive(Args)]
pub struct RunArgs {
    /// Server address [default: LIVELOCK_HOST:LIVELOCK_PORT, else 127.0.0.1:7873]
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Password for the server.
    #[arg(long, env = "LIVELOCK_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// How long to wait for the lock (0 = try once; e.g. 30s, 500ms, 2m) [default: forever]
    #[arg(long, value_parser = parse_duration)]
    wait: Option<Duration>,
    /// Take a shared (reader) hold instead of an exclusive one.
    #[arg(long)]
    shared: bool,
    /// Keep the hold this long if the connection drops, reconnecting meanwhile.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    grace: Duration,
    /// After SIGTERM (lock lost), wait this long before SIGKILL.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    kill_after: Duration,
    /// The lock to hold.
    name: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// "250ms", "30s", "2m", "1h", or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 30s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn fail(code: u8, message: std::fmt::Arguments<'_>) -> ExitCode {
    eprintln!("livelock run: {message}");
    ExitCode::from(code)
}

pub fn run(args: RunArgs) -> ExitCode {
    let addr = crate::admin::server_addr(&args.server);
    let options = ClientOptions {
        password: args.password.clone(),
        grace: args.grace,
        ..ClientOptions::default()
    };
    let mut client = match Client::connect(addr.as_str(), &options) {
        Ok(client) => client,
        Err(e) => {
            return fail(
                EXIT_NOT_LOCKED,
                format_args!("cannot open a session at {addr}: {e}"),
            )
        }
    };
    let acquire = AcquireOptions {
        mode: if args.shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        },
        wait: args.wait,
        lease: None,
    };
    let guard = match client.acquire_with(&args.name, acquire) {
        Ok(guard) => guard,
        Err(Error::Status(Status::Busy, _)) => {
            return fail(
                EXIT_NOT_LOCKED,
                format_args!("{} is held by someone else", args.name),
            )
        }
        Err(Error::Status(Status::TimedOut, _)) => {
            let waited = args.wait.unwrap_or_default();
            return fail(
                EXIT_NOT_LOCKED,
                format_args!("{} still held after waiting {waited:?}", args.name),
            );
        }
        Err(e) => {
            return fail(
                EXIT_NOT_LOCKED,
                format_args!("cannot lock {}: {e}", args.name),
            )
        }
    };
    let token = guard.token();
    // The hold is released explicitly at the end (or by the session's end).
    guard.forget();

    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGQUIT,
    ]) {
        Ok(signals) => signals,
        Err(e) => {
            return fail(
                EXIT_NO_COMMAND,
                format_args!("cannot install signal handlers: {e}"),
            )
        }
    };
    let (signal_tx, signal_rx) = crossbeam_channel::unbounded();
    let signal_handle = signals.handle();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            let _ = signal_tx.send(signal);
        }
    });

    let parent = std::process::id();
    let mut command = Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("LIVELOCK_FENCE", token.to_string());
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(EXIT_NO_COMMAND.into());
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = client.release(&args.name);
            return fail(
                EXIT_NO_COMMAND,
                format_args!("cannot start {:?}: {e}", args.command[0]),
            );
        }
    };
    let pid = child.id() as libc::pid_t;
    let (exit_tx, exit_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = exit_tx.send(child.wait());
    });

    let mut lost: Option<String> = None;
    let mut kill_at = never();
    let status: ExitStatus = loop {
        select! {
            recv(exit_rx) -> status => match status {
                Ok(Ok(status)) => break status,
                _ => break ExitStatus::from_raw(1 << 8),
            },
            recv(signal_rx) -> signal => {
                if let Ok(signal) = signal {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(pid, signal) };
                }
            },
            recv(client.events()) -> event => {
                let reason = match event {
                    Ok(Event::LockLost { name, .. }) if name == args.name.as_bytes() => Some("its lease ran out".to_string()),
                    Ok(Event::LockLost { .. } | Event::Shutdown | Event::Signal { .. }) => None,
                    Ok(Event::SessionTaken) => Some("another connection took the session".to_string()),
                    Ok(Event::Disconnected) | Err(_) => match reconnect(&addr, &client, &options) {
                        Some(resumed) => {
                            client = resumed;
                            None
                        }
                        None => Some(format!("the connection to {addr} was lost")),
                    },
                };
                if let (Some(reason), None) = (reason, &lost) {
                    eprintln!("livelock run: lock {} lost ({reason}); stopping the command", args.name);
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                    kill_at = after(args.kill_after);
                    lost = Some(reason);
                }
            },
            recv(kill_at) -> _ => {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                kill_at = never();
            },
        }
    };
    signal_handle.close();
    if lost.is_none() {
        if let Err(e) = client.release(&args.name) {
            eprintln!("livelock run: releasing {}: {e}", args.name);
        }
    }
    let _ = client.bye();
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => ExitCode::from(128u8.wrapping_add(signal as u8)),
        _ => ExitCode::from(1),
    }
}

/// Resumes the session within its grace; None when it cannot be had.
fn reconnect(addr: &str, client: &Client, options: &ClientOptions) -> Option<Client> {
    if options.grace.is_zero() {
        return None;
    }
    let deadline = Instant::now() + options.grace;
    let mut options = options.clone();
    while Instant::now() < deadline {
        options.connect_timeout = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        match Client::resume(addr, client.session_id(), client.secret(), &options) {
            Ok(resumed) => return Some(resumed),
            Err(Error::Status(Status::UnknownSession, _)) => return None,
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
