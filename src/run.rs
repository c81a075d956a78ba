//! `livelock run NAME -- COMMAND`: hold a lock while a command runs.
//!
//! The one promise: COMMAND never runs without the lock. It starts only after
//! the grant, and every process it starts is ended before the lock can be
//! had by anyone else:
//!
//! - COMMAND runs in its own process group, under a small supervisor process
//!   (`livelock run --supervise`, see [`supervise`]) that is a child
//!   subreaper: whatever COMMAND leaves behind stays its descendant. Every
//!   stop ends the whole group: SIGTERM, then SIGKILL after `--kill-after`.
//!   The supervisor exits (with COMMAND's status) only once no descendant is
//!   left, and only then is the lock released.
//! - A stop is: a signal to `livelock run` (TERM, INT, HUP, QUIT; forwarded
//!   to the group), the loss of the hold (lease, session taken without a
//!   `--grace` to take it back in, connection gone past `--grace`, a lock
//!   missing from the listing after a RESUME), or the end of COMMAND's main
//!   process (what it left running is stopped). A RESUME tries each server
//!   of `--server` in turn, the one that answered first.
//! - If `livelock run` dies (even by SIGKILL), the supervisor's parent-death
//!   signal makes it SIGKILL the group; the server frees the lock when our
//!   socket closes.
//! - Heartbeat: a PING every `HEARTBEAT_INTERVAL`. With no answer for
//!   `SILENCE_MAX` the connection is taken as cut (resumed within `--grace`
//!   if it can be): COMMAND's group gets SIGTERM, and is SIGKILLed so as to be
//!   gone at the latest `LOSS_BOUND + grace` after the send of the last
//!   answered PING: before the earliest moment a server with the default TCP
//!   tuning can find us dead (`SERVER_DEAD_PEER_MIN`) and let the grace run
//!   out.
//! - Signals ignored when `livelock run` starts (e.g. SIGHUP under `nohup`)
//!   are left ignored: not caught, not forwarded, and still ignored by
//!   COMMAND, which inherits the disposition.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use crossbeam_channel::{after, never, select, Receiver, Sender};

use livelock::client::{
    AcquireOptions, Client, ClientOptions, Error, Event, Guard, PoolGrant, Requirement,
};
use livelock::duration::seconds_flag;
use livelock::protocol::{Mode, Status, SECRET_LEN};

/// Exit statuses of `livelock run` other than COMMAND's own (README,
/// "Exit status"). A usage error is 2 (clap's, and ours for what clap
/// cannot check).
const EXIT_USAGE: u8 = 2;
/// The lock was not obtained in time (EX_TEMPFAIL): the only one to retry on.
const EXIT_NOT_LOCKED: u8 = 75;
/// No session could be opened: server down, unreachable, or at capacity
/// (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;
/// The server refused the password (EX_NOPERM).
const EXIT_AUTH: u8 = 77;
/// Anything else that went wrong on our side (EX_SOFTWARE).
const EXIT_INTERNAL: u8 = 70;
/// The lock was lost while COMMAND ran (COMMAND was stopped): whatever
/// COMMAND's own status, so a caller tells it from COMMAND failing.
const EXIT_LOCK_LOST: u8 = 79;
/// COMMAND could not be found, or not executed (as shells do).
const EXIT_NO_COMMAND: u8 = 127;
const EXIT_NOT_EXECUTABLE: u8 = 126;

/// A PING is sent this often while COMMAND runs.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// No PING answered for this long: the connection is taken as cut.
const SILENCE_MAX: Duration = Duration::from_secs(2);
/// The earliest a server with the default TCP tuning (keepalive 2 s idle + 3
/// probes 1 s apart, TCP_USER_TIMEOUT 5 s; `TcpTuning::default`) finds a
/// silent peer dead, counted from the last bytes it had from it. The lock is
/// freed then, plus the session's grace.
const SERVER_DEAD_PEER_MIN: Duration = Duration::from_secs(5);
/// Kept between COMMAND's end and that earliest release.
const LOSS_MARGIN: Duration = Duration::from_secs(1);
/// COMMAND's group is gone at the latest this long (plus the grace) after
/// the send of the last PING the server answered: 4 s.
const LOSS_BOUND: Duration = SERVER_DEAD_PEER_MIN.saturating_sub(LOSS_MARGIN);
/// The SIGKILL is sent this long before `LOSS_BOUND`, for it to take effect.
const KILL_LEAD: Duration = Duration::from_millis(500);
const _: () = assert!(HEARTBEAT_INTERVAL.as_millis() * 2 <= SILENCE_MAX.as_millis());
const _: () = assert!(SILENCE_MAX.as_millis() + KILL_LEAD.as_millis() < LOSS_BOUND.as_millis());

/// Signals that stop COMMAND: forwarded to its group (unless ignored when
/// `livelock run` started).
const STOP_SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Signals raised on the lock (`livelock signal NAME SIG`) that COMMAND gets
/// as the Unix signal of that name (`term`, `SIGTERM`, `usr1`... any case).
/// The supervisor is told which with SIGRTMIN + 1 + its place here.
const PUSHED_SIGNALS: [(&str, libc::c_int); 9] = [
    ("hup", libc::SIGHUP),
    ("int", libc::SIGINT),
    ("quit", libc::SIGQUIT),
    ("term", libc::SIGTERM),
    ("usr1", libc::SIGUSR1),
    ("usr2", libc::SIGUSR2),
    ("winch", libc::SIGWINCH),
    ("alrm", libc::SIGALRM),
    ("cont", libc::SIGCONT),
];

/// The place in PUSHED_SIGNALS of a signal raised on the lock, if it names one.
fn pushed_signal(raised: &[u8]) -> Option<usize> {
    let name = String::from_utf8_lossy(raised).to_ascii_lowercase();
    let name = name.strip_prefix("sig").unwrap_or(&name);
    PUSHED_SIGNALS.iter().position(|(n, _)| *n == name)
}

/// The realtime signal that tells the supervisor to pass PUSHED_SIGNALS[i] on.
fn forward_signal(i: usize) -> libc::c_int {
    libc::SIGRTMIN() + 1 + i as libc::c_int
}

/// The supervisor's parent-death signal.
const SUPERVISOR_PDEATHSIG: libc::c_int = libc::SIGUSR1;
/// From `livelock run` to the supervisor: SIGKILL the group now.
const SUPERVISOR_KILL_NOW: libc::c_int = libc::SIGUSR2;

/// How `run` and `hold` take the lock.
#[derive(Args)]
pub struct LockArgs {
    /// Server(s): HOST, HOST:PORT or livelock://HOST:PORT, comma-separated to try in order [default: LIVELOCK_HOST, LIVELOCK_PORT, else 127.0.0.1:7873]
    #[arg(long, value_name = "ADDR[,ADDR...]")]
    server: Option<String>,
    /// Password for the server.
    #[arg(long, env = "LIVELOCK_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// How long to wait for the lock (0 = try once; e.g. 30s, 500ms, 1h30m, forever) [default: forever]
    #[arg(short = 'w', long, value_parser = wait_flag)]
    wait: Option<WaitFlag>,
    /// Do not wait: exit 75 at once if the lock is held (same as --wait 0, like flock -n).
    #[arg(short = 'n', long = "nonblock", conflicts_with = "wait")]
    nonblock: bool,
    /// Take a shared (reader) hold instead of an exclusive one.
    #[arg(short = 's', long)]
    shared: bool,
    /// NAME is a counting semaphore: take N of its CAPACITY permits (N
    /// alone: 1 of N, like `consul lock -n N`). The capacity must be the
    /// semaphore's while anyone holds or waits for it.
    #[arg(long, value_name = "N[/CAPACITY]", value_parser = permits_flag, conflicts_with = "shared")]
    permits: Option<(u32, u32)>,
    /// Keep the hold this long if the connection drops, reconnecting meanwhile.
    #[arg(long, value_parser = seconds_flag, default_value = "0s")]
    grace: Duration,
    #[command(flatten)]
    tls: crate::admin::TlsArgs,
    /// End the hold after this long even if COMMAND still runs (COMMAND is then stopped, exit 79), e.g. 10m [default: none].
    #[arg(long, value_parser = seconds_flag)]
    lease: Option<Duration>,
}

/// What `run` tells COMMAND's process tree it holds, one line per lock:
/// `SERVER MODE HEXNAME` (a nested `run` of one of them would wait forever).
const HELD_VAR: &str = "LIVELOCK_HELD";

/// One line of `LIVELOCK_HELD`.
fn held_line(server: &str, mode: Mode, name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    let mode = match mode {
        Mode::Exclusive => "exclusive",
        Mode::Shared => "shared",
        Mode::Permits => "permits",
    };
    format!("{server} {mode} {hex}")
}

/// Whether an enclosing `run` (per `held`, the inherited `LIVELOCK_HELD`)
/// holds `name` on one of `servers`: this acquire could wait for it
/// forever — shared inside shared too, as a queued exclusive acquire puts
/// the inner shared one behind it (FIFO), and permits inside permits (the
/// outer ones may be what the inner acquire waits for).
fn held_by_enclosing_run(held: &str, servers: &[String], name: &str) -> bool {
    servers.iter().any(|server| {
        [Mode::Exclusive, Mode::Shared, Mode::Permits]
            .iter()
            .any(|&mode| held.lines().any(|l| l == held_line(server, mode, name)))
    })
}

/// Gives every hold of `guards` the `lease` (ACQUIRE_ALL takes none: an
/// EXTEND each, right after the grant) and keeps them (released at the
/// end); their tokens. If one cannot be given its lease, all are released.
fn lease_all(
    guards: Option<Vec<Guard>>,
    lease: Option<Duration>,
) -> Result<Option<Vec<u64>>, Error> {
    let Some(guards) = guards else {
        return Ok(None);
    };
    if let Some(lease) = lease {
        for guard in &guards {
            guard.extend(lease)?;
        }
    }
    let tokens = guards.iter().map(Guard::token).collect();
    guards.into_iter().for_each(Guard::forget);
    Ok(Some(tokens))
}

/// What `run` holds: every name with its token (released in this order at
/// the end), of which the first `fence` tokens are COMMAND's
/// LIVELOCK_FENCE; a pool's resources per requirement.
struct Holding {
    names: Vec<String>,
    tokens: Vec<u64>,
    fence: usize,
    resources: Vec<Vec<String>>,
}

/// The holds of a granted pool request, given the `lease` (an EXTEND each)
/// and kept (released at the end). If one cannot be given its lease, all
/// are released.
fn pool_holding(
    grant: Option<PoolGrant>,
    lease: Option<Duration>,
) -> Result<Option<Holding>, Error> {
    let Some(grant) = grant else {
        return Ok(None);
    };
    if let Some(lease) = lease {
        for guard in grant.guards() {
            guard.extend(lease)?;
        }
    }
    let text = |name: &[u8]| String::from_utf8_lossy(name).into_owned();
    let resources: Vec<Vec<String>> = (0..grant.requirements())
        .map(|r| grant.names(r).into_iter().map(text).collect())
        .collect();
    let holding = Holding {
        names: grant.guards().map(|g| text(g.name())).collect(),
        tokens: grant.guards().map(Guard::token).collect(),
        fence: resources.iter().map(Vec::len).sum(),
        resources,
    };
    grant.forget();
    Ok(Some(holding))
}

/// The pool requirements as the server would check them (a usage error
/// here).
fn check_pools(pools: &[Requirement]) -> Result<(), String> {
    let mut bytes = Vec::new();
    for r in pools {
        let list: Vec<(&[u8], &[u8])> =
            r.candidates.iter().map(|(n, t)| (&n[..], &t[..])).collect();
        livelock::pool::PoolSpec::encode(r.need, &r.filter, &list, &mut bytes);
    }
    let count = u16::try_from(pools.len()).unwrap_or(u16::MAX);
    let Some(spec) = livelock::pool::PoolSpec::parse(count, &bytes) else {
        return Err(format!(
            "--pool: at most {} of them, K at most its candidates, at most {} distinct \
             candidate names in all, each 1 to {} bytes, tags of at most {} bytes",
            livelock::limits::POOL_REQUIREMENTS_MAX,
            livelock::limits::POOL_CANDIDATES_MAX,
            livelock::limits::NAME_LEN_MAX,
            livelock::limits::TAGS_LEN_MAX,
        ));
    };
    match spec.short_requirement() {
        Some(r) => Err(format!(
            "--pool {:?}: its filter leaves fewer candidates than it needs",
            String::from_utf8_lossy(&pools[r].filter)
        )),
        None => Ok(()),
    }
}

/// The first of `names` the resumed `client` no longer holds with its token.
fn missing_after_resume<'n>(
    client: &Client,
    names: &'n [String],
    tokens: &[u64],
) -> Option<&'n str> {
    let holds = client.resumed().map(|r| r.holds).unwrap_or_default();
    names
        .iter()
        .zip(tokens)
        .find(|(name, token)| {
            !holds
                .iter()
                .any(|h| h.name == name.as_bytes() && h.token == **token)
        })
        .map(|(name, _)| name.as_str())
}

/// The names to take, as the server would check them (a usage error here).
fn check_names(names: &[String]) -> Result<(), String> {
    if names.len() > livelock::limits::MULTI_NAMES_MAX {
        return Err(format!(
            "--all takes at most {} names, not {}",
            livelock::limits::MULTI_NAMES_MAX,
            names.len()
        ));
    }
    let max = livelock::limits::NAME_LEN_MAX;
    for name in names {
        if name.is_empty() || name.len() > max {
            let shown: String = name.chars().take(40).collect();
            let more = if shown.len() < name.len() { "…" } else { "" };
            return Err(format!(
                "a lock name is 1 to {max} bytes, not {} ({shown:?}{more})",
                name.len()
            ));
        }
        if names.iter().filter(|n| *n == name).count() > 1 {
            return Err(format!("{name} is named twice"));
        }
    }
    match names.is_empty() {
        true => Err("no lock named".into()),
        false => Ok(()),
    }
}

/// `--pool 'K of NAME[TAGS],... [where FILTER]'`: one requirement. TAGS
/// and FILTER are `key=value` pairs joined by `,` (`gpu3[model=T1000]`,
/// `where model=T1000,site=lab2`).
fn pool_flag(text: &str) -> Result<Requirement, String> {
    let usage = || format!("{text:?} is not 'K of NAME[,NAME...] [where KEY=VALUE,...]'");
    let (need, rest) = text.trim().split_once(" of ").ok_or_else(usage)?;
    let need: u16 = need
        .trim()
        .parse()
        .ok()
        .filter(|&k| k > 0)
        .ok_or_else(usage)?;
    let (list, filter) = match rest.split_once(" where ") {
        Some((list, filter)) => (list, filter.trim()),
        None => (rest, ""),
    };
    // Candidates are split at commas outside brackets.
    let mut candidates = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    let list = list.trim();
    for (i, c) in list.char_indices().chain([(list.len(), ',')]) {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                let item = list[start..i].trim();
                let (name, tags) = match item.strip_suffix(']').and_then(|t| t.split_once('[')) {
                    Some((name, tags)) => (name.trim(), tags.trim()),
                    None => (item, ""),
                };
                if name.is_empty()
                    || name.contains(['[', ']'])
                    || name.contains(char::is_whitespace)
                {
                    return Err(format!(
                        "{item:?}: a pool's candidate is NAME or NAME[KEY=VALUE,...] (no spaces)"
                    ));
                }
                candidates.push((name.to_string(), tags.to_string()));
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(usage());
    }
    for text in candidates.iter().map(|(_, t)| t.as_str()).chain([filter]) {
        if !livelock::pool::tags_valid(text.as_bytes()) {
            return Err(format!("{text:?}: tags are KEY=VALUE pairs joined by ','"));
        }
    }
    Ok(Requirement::tagged(need, candidates).filter(filter))
}

/// `--permits N[/CAPACITY]`: (weight, capacity); `N` alone is 1 of N.
fn permits_flag(text: &str) -> Result<(u32, u32), String> {
    let number = |t: &str| {
        t.trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{t:?} is not a whole number from 1 to {}", u32::MAX))
    };
    let (weight, capacity) = match text.split_once('/') {
        Some((weight, capacity)) => (number(weight)?, number(capacity)?),
        None => (1, number(text)?),
    };
    if weight > capacity {
        return Err(format!(
            "{weight} permits of a capacity of {capacity} can never be had"
        ));
    }
    Ok((weight, capacity))
}

#[derive(Args)]
#[command(
    after_help = "Exit status: COMMAND's own (128 + N if killed by signal N); \
75 the lock was not obtained in time; 79 the lock was lost while COMMAND ran (it was \
stopped); 2 usage error; 69 no session (server down, unreachable or at capacity); \
77 password refused; 70 other error; 126/127 COMMAND not executable / not found."
)]
pub struct RunArgs {
    #[command(flatten)]
    lock: LockArgs,
    /// Run this shell command (sh -c) instead of COMMAND after `--`, like flock -c.
    #[arg(
        short = 'c',
        long = "command",
        value_name = "SHELL_COMMAND",
        conflicts_with = "command"
    )]
    shell_command: Option<String>,
    /// After SIGTERM (a stop), wait this long before SIGKILL.
    #[arg(long, value_parser = seconds_flag, default_value = "10s")]
    kill_after: Duration,
    /// Internal: be the supervisor of COMMAND for the `livelock run` of this pid.
    #[arg(long, hide = true, value_name = "PID")]
    supervise: Option<u32>,
    /// Instead of NAME, hold every one of these locks (comma-separated, up
    /// to 32), taken at once, all or none (`--shared`: all shared);
    /// COMMAND gets their tokens in LIVELOCK_FENCE, space-separated, in
    /// this order.
    #[arg(long, value_name = "NAME,NAME...", value_delimiter = ',', conflicts_with_all = ["name", "permits", "pool"])]
    all: Vec<String>,
    /// Instead of NAME, take K of these resources (repeat it for several
    /// requirements, all taken at once or none): 'K of NAME,NAME,...',
    /// candidates may carry tags, 'NAME[KEY=VALUE,...]', and the
    /// requirement a filter, '... where KEY=VALUE,...'. COMMAND gets the
    /// names in LIVELOCK_RESOURCES (space-separated, requirement by
    /// requirement; LIVELOCK_RESOURCES_1... each requirement's) and their
    /// tokens in LIVELOCK_FENCE, in the same order.
    #[arg(long, value_name = "'K of NAME,...'", value_parser = pool_flag, conflicts_with_all = ["name", "permits", "shared"])]
    pool: Vec<Requirement>,
    /// The lock to hold.
    #[arg(required_unless_present_any = ["all", "pool", "supervise"])]
    name: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(
        last = true,
        required_unless_present = "shell_command",
        value_name = "COMMAND"
    )]
    command: Vec<OsString>,
}

/// `--wait`: a duration (plain number: seconds), or `forever`.
#[derive(Debug, Clone, Copy)]
pub struct WaitFlag(Option<Duration>);

fn wait_flag(text: &str) -> Result<WaitFlag, String> {
    livelock::duration::parse_or_forever(text, Duration::from_secs(1)).map(WaitFlag)
}

fn fail(code: u8, message: std::fmt::Arguments<'_>) -> ExitCode {
    eprintln!("livelock run: {message}");
    ExitCode::from(code)
}

/// Whether `signal` is ignored (SIG_IGN) in this process.
fn ignored(signal: libc::c_int) -> bool {
    // SAFETY: sigaction(2) with a null new action only reads the disposition.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

fn exit_code(status: ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => ExitCode::from(128u8.wrapping_add(signal as u8)),
        _ => ExitCode::from(1),
    }
}

/// `livelock hold NAME`: holds the lock until interrupted (Ctrl-C, SIGTERM,
/// SIGHUP: exit 0), printing its fencing token — `run` with a COMMAND that
/// prints `$LIVELOCK_FENCE` and waits, so a hold gets all of `run`'s care
/// (heartbeats, partitions, lost locks: 79).
#[derive(Args)]
#[command(
    after_help = "Exit status: 0 when interrupted after holding the lock; 75 not obtained \
in time; 79 lost while held; 2 usage error; 69 no session; 77 password refused; 70 other error."
)]
pub struct HoldArgs {
    #[command(flatten)]
    lock: LockArgs,
    /// Instead of NAME, hold every one of these locks (comma-separated, up
    /// to 32), taken at once, all or none; their tokens are printed on one
    /// line, space-separated, in this order.
    #[arg(long, value_name = "NAME,NAME...", value_delimiter = ',', conflicts_with_all = ["name", "permits", "pool"])]
    all: Vec<String>,
    /// Instead of NAME, take K of these resources (as `run --pool`); the
    /// names taken are printed on a line before the tokens.
    #[arg(long, value_name = "'K of NAME,...'", value_parser = pool_flag, conflicts_with_all = ["name", "permits", "shared"])]
    pool: Vec<Requirement>,
    /// The lock to hold.
    #[arg(required_unless_present_any = ["all", "pool"])]
    name: Option<String>,
}

/// (A background `sleep` ignores SIGINT in a non-interactive shell: the
/// trap ends it, or the supervisor would wait `--kill-after` for it.)
const HOLD_SCRIPT: &str = r#"trap 'kill $pid 2>/dev/null; exit 0' INT TERM HUP; [ -n "$LIVELOCK_RESOURCES" ] && echo "$LIVELOCK_RESOURCES"; echo "$LIVELOCK_FENCE"; while :; do sleep 3600 & pid=$!; wait $pid; done"#;

pub fn hold(args: HoldArgs) -> ExitCode {
    run(RunArgs {
        lock: args.lock,
        kill_after: Duration::from_secs(10),
        supervise: None,
        shell_command: Some(HOLD_SCRIPT.into()),
        all: args.all,
        pool: args.pool,
        name: args.name,
        command: Vec::new(),
    })
}

pub fn run(mut args: RunArgs) -> ExitCode {
    if let Some(shell_command) = args.shell_command.take() {
        args.command = vec!["sh".into(), "-c".into(), shell_command.into()];
    }
    if args.lock.nonblock {
        args.lock.wait = Some(WaitFlag(Some(Duration::ZERO)));
    }
    if let Some(parent) = args.supervise {
        return supervise(parent, args.kill_after, &args.command);
    }
    // Before any handler is installed: what the caller wants ignored (nohup).
    let stop_signals: Vec<libc::c_int> = STOP_SIGNALS
        .into_iter()
        .filter(|&signal| !ignored(signal))
        .collect();
    // --all: several names, taken all at once; --pool: K of N resources
    // per requirement, all requirements at once.
    let pools = std::mem::take(&mut args.pool);
    let all = args.name.is_none() && pools.is_empty();
    let names: Vec<String> = match args.name.take() {
        Some(name) => vec![name],
        None if pools.is_empty() => std::mem::take(&mut args.all),
        None => pools
            .iter()
            .flat_map(|r| r.candidates.iter())
            .map(|(name, _)| String::from_utf8_lossy(name).into_owned())
            .collect(),
    };
    // What the server would refuse, refused here with a usage error.
    let checked = match pools.is_empty() {
        true => check_names(&names),
        false => check_pools(&pools),
    };
    if let Err(e) = checked {
        return fail(EXIT_USAGE, format_args!("{e}"));
    }
    // The locks, as messages name them.
    let shown = names.join(",");
    let grace_max = Duration::from_millis(livelock::limits::GRACE_MS_MAX.into());
    if args.lock.grace > grace_max {
        return fail(
            EXIT_USAGE,
            format_args!(
                "--grace is at most {grace_max:?}, not {:?}",
                args.lock.grace
            ),
        );
    }
    let servers = match crate::admin::servers(&args.lock.server) {
        Ok(servers) => servers,
        Err(e) => return fail(EXIT_USAGE, format_args!("{e}")),
    };
    let held = std::env::var(HELD_VAR).unwrap_or_default();
    if let Some(name) = names
        .iter()
        .find(|name| held_by_enclosing_run(&held, &servers, name))
    {
        return fail(
            EXIT_USAGE,
            format_args!(
                "{name} is already held by an enclosing `livelock run` of this process tree \
                 ({HELD_VAR}): waiting for it would never end"
            ),
        );
    }
    let lease_max = Duration::from_millis(u32::MAX.into());
    if args
        .lock
        .lease
        .is_some_and(|l| l.is_zero() || l > lease_max)
    {
        return fail(
            EXIT_USAGE,
            format_args!("--lease must be more than 0 and at most {lease_max:?}"),
        );
    }
    let base = ClientOptions {
        password: args.lock.password.clone(),
        grace: args.lock.grace,
        ..ClientOptions::default()
    };
    let all_options = match crate::admin::server_options(&servers, &base, &args.lock.tls) {
        Ok(options) => options,
        Err(e) => return fail(EXIT_USAGE, format_args!("{e}")),
    };
    let (client, addr, options) = match crate::admin::connect_first(&servers, &all_options) {
        Ok((client, addr, options)) => (client, addr.to_string(), options.clone()),
        Err((addr, e @ Error::Status(Status::Auth, _))) => {
            return fail(EXIT_AUTH, format_args!("{addr} refused the password: {e}"))
        }
        Err((addr, e)) => {
            return fail(
                EXIT_UNAVAILABLE,
                format_args!("cannot open a session at {addr}: {e}"),
            )
        }
    };
    // A reconnect (RESUME) tries the server that answered, then the others
    // (a cluster's members all know the session).
    let mut resume_at = vec![(addr.clone(), options.clone())];
    resume_at.extend(
        servers
            .iter()
            .cloned()
            .zip(all_options)
            .filter(|(other, _)| *other != addr),
    );
    let mode = match (args.lock.permits, args.lock.shared) {
        (Some(_), _) => Mode::Permits,
        (None, true) => Mode::Shared,
        (None, false) => Mode::Exclusive,
    };
    let (weight, capacity) = args.lock.permits.unwrap_or((1, 0));
    let acquire = AcquireOptions {
        mode,
        wait: args.lock.wait.and_then(|w| w.0),
        lease: args.lock.lease,
        weight,
        capacity,
    };
    // The holds are released explicitly at the end (or by the session's end).
    let plain = |tokens: Vec<u64>| Holding {
        fence: tokens.len(),
        names: names.clone(),
        tokens,
        resources: Vec::new(),
    };
    let taken = match (all, pools.is_empty()) {
        (false, true) => client.acquire_with(&names[0], acquire).map(|guard| {
            let token = guard.token();
            guard.forget();
            Some(plain(vec![token]))
        }),
        (true, _) => {
            let list: Vec<(&str, Mode)> = names.iter().map(|n| (n.as_str(), mode)).collect();
            client
                .acquire_all(&list, acquire.wait)
                .and_then(|guards| lease_all(guards, args.lock.lease))
                .map(|tokens| tokens.map(plain))
        }
        (false, false) => client
            .acquire_pool(&pools, acquire.wait)
            .and_then(|grant| pool_holding(grant, args.lock.lease)),
    };
    let holding = match taken {
        Ok(Some(holding)) => holding,
        Ok(None) | Err(Error::Status(Status::Busy | Status::TimedOut, _)) => {
            let waited = args.lock.wait.and_then(|w| w.0).unwrap_or_default();
            return match waited.is_zero() {
                true => fail(
                    EXIT_NOT_LOCKED,
                    format_args!("{shown} is held by someone else"),
                ),
                false => fail(
                    EXIT_NOT_LOCKED,
                    format_args!("{shown} still held after waiting {waited:?}"),
                ),
            };
        }
        Err(e) => return fail(EXIT_UNAVAILABLE, format_args!("cannot lock {shown}: {e}")),
    };
    // From here on, the names are what is held (a pool's: the resources
    // taken and the queues' permits).
    let Holding {
        names,
        tokens,
        fence,
        resources,
    } = holding;
    // The first heartbeat: the hold is confirmed from here on.
    let confirmed = Instant::now();
    if let Err(e) = client.ping() {
        return fail(
            EXIT_UNAVAILABLE,
            format_args!("lost the connection right after locking {shown}: {e}"),
        );
    }

    let mut signals = match signal_hook::iterator::Signals::new(&stop_signals) {
        Ok(signals) => signals,
        Err(e) => {
            return fail(
                EXIT_INTERNAL,
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

    // COMMAND's tree learns what it holds (a nested run of it fails fast).
    let mut held_env = held;
    if !held_env.is_empty() && !held_env.ends_with('\n') {
        held_env.push('\n');
    }
    let lines: Vec<String> = names.iter().map(|n| held_line(&addr, mode, n)).collect();
    held_env.push_str(&lines.join("\n"));
    let fence: Vec<String> = tokens[..fence].iter().map(u64::to_string).collect();
    let mut env = vec![
        ("LIVELOCK_FENCE".to_string(), fence.join(" ")),
        (HELD_VAR.to_string(), held_env),
    ];
    if !resources.is_empty() {
        env.push(("LIVELOCK_RESOURCES".into(), resources.concat().join(" ")));
        for (r, list) in resources.iter().enumerate() {
            env.push((format!("LIVELOCK_RESOURCES_{}", r + 1), list.join(" ")));
        }
    }
    let supervisor = match spawn_supervisor(&args, &env) {
        Ok(child) => child,
        Err(e) => {
            for name in &names {
                let _ = client.release(name);
            }
            return fail(
                EXIT_INTERNAL,
                format_args!("cannot start the supervisor of {:?}: {e}", args.command[0]),
            );
        }
    };
    let supervisor_pid = supervisor.id() as libc::pid_t;
    let (exit_tx, exit_rx) = crossbeam_channel::bounded(1);
    let mut supervisor = supervisor;
    std::thread::spawn(move || {
        let _ = exit_tx.send(supervisor.wait());
    });
    // SAFETY: kill(2) on our own child, which is not reaped before `exit_rx` says so.
    let tell = |signal: libc::c_int| unsafe {
        libc::kill(supervisor_pid, signal);
    };

    let ours = |name: &[u8]| names.iter().any(|n| n.as_bytes() == name);
    let mut link = Link::start(Arc::new(client), confirmed, 0);
    let mut reconnecting: Option<Receiver<Option<(Client, Instant)>>> = None;
    let mut lost: Option<String> = None;
    let mut killed = false;
    let status: ExitStatus = loop {
        let now = Instant::now();
        let silent_at = link.confirmed + SILENCE_MAX;
        let kill_at = link.confirmed + LOSS_BOUND - KILL_LEAD + args.lock.grace;
        let term_at = silent_at.max(kill_at.checked_sub(args.kill_after).unwrap_or(silent_at));
        let mut reason: Option<String> = None;
        if now >= silent_at && reconnecting.is_none() && lost.is_none() {
            if args.lock.grace.is_zero() {
                reason = Some(format!("no answer from {addr} for {SILENCE_MAX:?}"));
            } else {
                reconnecting = Some(start_reconnect(&resume_at, &link.client, kill_at));
            }
        }
        if now >= term_at && lost.is_none() {
            reason = Some(format!(
                "no answer from {addr} for {:?}",
                now - link.confirmed
            ));
        }
        if now >= kill_at && !killed {
            eprintln!(
                "livelock run: no answer from {addr} for {:?}: killing the command before the server can free {}",
                now - link.confirmed,
                shown
            );
            tell(SUPERVISOR_KILL_NOW);
            killed = true;
        }
        if let Some(reason) = reason.take() {
            stop_on_loss(&shown, &reason, &mut lost, &tell);
        }
        let wake = [silent_at, term_at, kill_at]
            .into_iter()
            .filter(|&at| at > now)
            .min()
            .map_or_else(never, |at| after(at - now));
        let reconnected = reconnecting.clone().unwrap_or_else(never);
        select! {
            recv(exit_rx) -> status => match status {
                Ok(Ok(status)) => break status,
                _ => break ExitStatus::from_raw(1 << 8),
            },
            recv(signal_rx) -> signal => {
                if let Ok(signal) = signal {
                    tell(signal);
                }
            },
            recv(link.heartbeats) -> sent => match sent {
                Ok(sent) => link.confirmed = link.confirmed.max(sent),
                Err(_) => link.heartbeats = never(),
            },
            recv(link.events) -> event => {
                let reason = match event {
                    Ok(Event::LockLost { name, .. }) if ours(&name) => Some(format!("{}: its lease ran out, or an operator released it", String::from_utf8_lossy(&name))),
                    Ok(Event::Signal { name, signal }) if ours(&name) => {
                        let (name, signal_shown) = (String::from_utf8_lossy(&name), String::from_utf8_lossy(&signal));
                        match pushed_signal(&signal) {
                            Some(i) => {
                                eprintln!("livelock run: signal {signal_shown} raised on {name}: passed to COMMAND");
                                tell(forward_signal(i));
                            }
                            None => eprintln!("livelock run: signal {signal_shown} raised on {name} (not a Unix signal name: COMMAND is not told)"),
                        }
                        None
                    }
                    Ok(Event::LockLost { .. } | Event::Shutdown | Event::Signal { .. }) => None,
                    // Our own RESUME takes the session from the old connection.
                    Ok(Event::SessionTaken) if reconnecting.is_some() => None,
                    // Only this process knows the secret: a RESUME of ours
                    // that timed out (a frozen server) can still be
                    // delivered later and take the session. It is taken
                    // back like a lost connection (within the grace); the
                    // listing then says whether every lock is still held.
                    Ok(Event::SessionTaken) if args.lock.grace.is_zero() => {
                        Some("another connection took the session".to_string())
                    }
                    ended @ (Ok(Event::SessionTaken | Event::Disconnected) | Err(_)) => {
                        link.events = never();
                        if args.lock.grace.is_zero() {
                            Some(format!("the connection to {addr} was lost"))
                        } else {
                            if matches!(ended, Ok(Event::SessionTaken)) {
                                eprintln!("livelock run: another connection took the session; taking it back");
                            }
                            if reconnecting.is_none() {
                                reconnecting = Some(start_reconnect(&resume_at, &link.client, kill_at));
                            }
                            None
                        }
                    }
                };
                if let Some(reason) = reason {
                    stop_on_loss(&shown, &reason, &mut lost, &tell);
                }
            },
            recv(reconnected) -> resumed => {
                reconnecting = None;
                match resumed {
                    Ok(Some((client, sent))) => {
                        // A lock lost while detached is not pushed: it is
                        // missing from the RESUME's listing.
                        if let Some(name) = missing_after_resume(&client, &names, &tokens) {
                            let reason = format!("{name} was lost while the connection was down");
                            stop_on_loss(&shown, &reason, &mut lost, &tell);
                        }
                        let confirmed = link.confirmed.max(sent);
                        link = Link::start(Arc::new(client), confirmed, link.generation + 1);
                    }
                    _ => stop_on_loss(&shown, &format!("the connection to {addr} was lost"), &mut lost, &tell),
                }
            },
            recv(wake) -> _ => {},
        }
    };
    signal_handle.close();
    // COMMAND ended while a reconnect was under way: let it end (it gives
    // up by itself at the grace's bound), so that the release goes through
    // the resumed session instead of the dead connection (which would leave
    // the lock held until the grace runs out).
    if let (Some(pending), None) = (reconnecting.take(), &lost) {
        if let Ok(Some((client, sent))) = pending.recv() {
            let confirmed = link.confirmed.max(sent);
            link = Link::start(Arc::new(client), confirmed, link.generation + 1);
        }
    }
    // Every name is given back, also after one was lost (the others are
    // still held; the lost one's release is refused harmlessly).
    link.finish(&names);
    match lost {
        // Said on stderr when it happened (`stop_on_loss`).
        Some(_) => ExitCode::from(EXIT_LOCK_LOST),
        None => exit_code(status),
    }
}

/// Stops COMMAND (once) because the hold is lost.
fn stop_on_loss(name: &str, reason: &str, lost: &mut Option<String>, tell: &impl Fn(libc::c_int)) {
    if lost.is_none() {
        eprintln!("livelock run: lock {name} lost ({reason}); stopping the command");
        tell(libc::SIGTERM);
        *lost = Some(reason.to_string());
    }
}

/// Starts `livelock run --supervise`, which starts COMMAND.
fn spawn_supervisor(
    args: &RunArgs,
    env: &[(String, String)],
) -> std::io::Result<std::process::Child> {
    let parent = std::process::id();
    // /proc/self/exe: this very binary, even if its file was replaced since.
    let mut command = Command::new("/proc/self/exe");
    command
        .arg("run")
        .arg("--supervise")
        .arg(parent.to_string())
        .arg("--kill-after")
        .arg(format!("{}ms", args.kill_after.as_millis()))
        .arg("--")
        .args(&args.command)
        .envs(env.iter().map(|(k, v)| (k, v)));
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Set in this thread's child: sent when this (the main) thread ends.
            if libc::prctl(libc::PR_SET_PDEATHSIG, SUPERVISOR_PDEATHSIG) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // We may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(EXIT_NO_COMMAND.into());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// One connection to the server and its heartbeat.
struct Link {
    client: Arc<Client>,
    /// Which connection this is (0, then one more per resume).
    generation: u64,
    events: Receiver<Event>,
    /// Send times of answered PINGs.
    heartbeats: Receiver<Instant>,
    /// The send time of the last PING (or request) the server answered: it
    /// has heard from us since.
    confirmed: Instant,
    /// Dropped to end the heartbeat thread.
    stop: Option<Sender<()>>,
    /// Closed when the heartbeat thread has ended.
    done: Receiver<()>,
}

impl Link {
    fn start(client: Arc<Client>, confirmed: Instant, generation: u64) -> Link {
        let (beat_tx, heartbeats) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
        let pinged = client.clone();
        std::thread::spawn(move || {
            let _done = done_tx;
            loop {
                let sent = Instant::now();
                if pinged.ping().is_err() || beat_tx.send(sent).is_err() {
                    return;
                }
                let next = (sent + HEARTBEAT_INTERVAL).saturating_duration_since(Instant::now());
                if stop_rx.recv_timeout(next) != Err(crossbeam_channel::RecvTimeoutError::Timeout) {
                    return;
                }
            }
        });
        Link {
            events: client.events().clone(),
            client,
            generation,
            heartbeats,
            confirmed,
            stop: Some(stop_tx),
            done,
        }
    }

    /// Releases `names` and ends the session; bounded by `SILENCE_MAX` (the
    /// connection may be cut: then the server frees the locks when it finds
    /// us gone).
    fn finish(mut self, names: &[String]) {
        self.stop.take();
        let _ = self.done.recv_timeout(SILENCE_MAX);
        let client = self.client;
        let owned = names.to_vec();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            for name in &owned {
                match client.release(name) {
                    Ok(()) | Err(Error::Status(Status::NotHeld, _)) => {}
                    Err(e) => eprintln!("livelock run: releasing {name}: {e}"),
                }
            }
            if let Ok(client) = Arc::try_unwrap(client) {
                let _ = client.bye();
            }
            let _ = tx.send(());
        });
        if rx.recv_timeout(SILENCE_MAX).is_err() {
            eprintln!(
                "livelock run: no answer from the server while letting go of {}",
                names.join(",")
            );
        }
    }
}

/// Resumes the session on a new connection, trying until `until`; the new
/// client and the send time of the RESUME that worked, or None.
/// Resumes the session in the background, at the servers of `resume_at`
/// in turn (the one that answered first), until `until`.
fn start_reconnect(
    resume_at: &[(String, ClientOptions)],
    client: &Client,
    until: Instant,
) -> Receiver<Option<(Client, Instant)>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let resume_at = resume_at.to_vec();
    let (session_id, secret) = (client.session_id(), client.secret());
    std::thread::spawn(move || {
        let _ = tx.send(reconnect(&resume_at, session_id, secret, until));
    });
    rx
}

/// RESUMEs at each of `resume_at` in turn (a cluster's members all know
/// the session: a node that is down or frozen is passed for the next)
/// until one takes it or `until`. Gives up early only when the first — the
/// server that opened the session — does not know it (another server of
/// the list may be an unrelated one).
fn reconnect(
    resume_at: &[(String, ClientOptions)],
    session_id: u64,
    secret: [u8; SECRET_LEN],
    until: Instant,
) -> Option<(Client, Instant)> {
    for (i, (addr, options)) in resume_at.iter().enumerate().cycle() {
        let sent = Instant::now();
        let left = until.saturating_duration_since(sent);
        if left.is_zero() {
            return None;
        }
        let options = ClientOptions {
            connect_timeout: left.min(SILENCE_MAX).max(Duration::from_millis(10)),
            ..options.clone()
        };
        match Client::resume(addr.as_str(), session_id, secret, &options) {
            Ok(resumed) => {
                eprintln!("livelock run: session resumed at {addr}");
                return Some((resumed, sent));
            }
            Err(Error::Status(Status::UnknownSession, _)) if i == 0 => return None,
            Err(_) if i + 1 == resume_at.len() => {
                std::thread::sleep(Duration::from_millis(100).min(left))
            }
            Err(_) => {}
        }
    }
    None
}

// ---- the supervisor ---------------------------------------------------------

/// `livelock run --supervise PID`: started by the `livelock run` of PID with
/// its parent-death signal set (SUPERVISOR_PDEATHSIG). Starts COMMAND in a new
/// process group and is a child subreaper, so every process of COMMAND's
/// tree stays its descendant. Single-threaded; waits for signals with
/// `sigtimedwait`:
/// - TERM, INT, HUP, QUIT from PID: forwarded to the group; SIGKILL follows
///   after `kill_after`. From anyone else (e.g. the terminal): ignored, PID
///   forwards what it gets.
/// - SUPERVISOR_KILL_NOW from PID: SIGKILL the group.
/// - the parent-death signal, or any wake-up finding another parent: SIGKILL
///   the group.
/// - COMMAND's main process exits: what is left of the group is stopped
///   (SIGTERM, then SIGKILL).
///
/// Exits, with COMMAND's status (128 + signal if it was killed), only when
/// it has no descendant left.
fn supervise(parent: u32, kill_after: Duration, command: &[OsString]) -> ExitCode {
    let forwarded = (0..PUSHED_SIGNALS.len()).map(forward_signal);
    let waited: Vec<libc::c_int> = [
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        SUPERVISOR_PDEATHSIG,
        SUPERVISOR_KILL_NOW,
    ]
    .into_iter()
    .chain(forwarded)
    .collect();
    // SAFETY: plain libc calls on a local signal set; this process has one thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in &waited {
            libc::sigaddset(&mut set, signal);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
        set
    };
    // SAFETY: getppid(2) cannot fail.
    let parent_alive = || unsafe { libc::getppid() } as u32 == parent;
    if !parent_alive() {
        return fail(EXIT_INTERNAL, format_args!("livelock run is gone"));
    }
    let supervisor = std::process::id();
    let mut main = Command::new(&command[0]);
    main.args(&command[1..]).process_group(0);
    // SAFETY: only async-signal-safe calls (sigprocmask, prctl, getppid, _exit)
    // between fork and exec.
    unsafe {
        main.pre_exec(move || {
            // COMMAND starts with no signal blocked; ignored ones stay ignored.
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            // Should the supervisor itself be killed, the main process goes too.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != supervisor {
                libc::_exit(EXIT_NO_COMMAND.into());
            }
            Ok(())
        });
    }
    let group = match main.spawn() {
        Ok(child) => child.id() as libc::pid_t,
        Err(e) => {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => EXIT_NO_COMMAND,
                _ => EXIT_NOT_EXECUTABLE,
            };
            return fail(code, format_args!("cannot start {:?}: {e}", command[0]));
        }
    };
    // SAFETY: kill(2) on COMMAND's process group (its leader is our child).
    let signal_group = |signal: libc::c_int| unsafe {
        libc::kill(-group, signal);
    };
    let mut main_status: Option<libc::c_int> = None;
    // Set by the first stop (SIGTERM stage); SIGKILL when it passes.
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    let mut orphaned = false;
    loop {
        // Reap every child that ended (COMMAND's main process, or orphans
        // of its tree, which are ours as subreaper).
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == group {
                main_status = Some(status);
            } else if pid == 0 {
                break;
            } else if pid < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // No descendant left.
                    _ => return supervisor_exit(main_status),
                }
            }
        }
        if !orphaned && !parent_alive() {
            orphaned = true;
        }
        if orphaned {
            signal_group(libc::SIGKILL);
            killed = true;
        }
        if main_status.is_some() && kill_at.is_none() {
            // COMMAND is done: what it left running is stopped.
            signal_group(libc::SIGTERM);
            kill_at = Some(Instant::now() + kill_after);
        }
        let timeout = kill_at.filter(|_| !killed).map(|at| {
            let left = at.saturating_duration_since(Instant::now());
            libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos().into(),
            }
        });
        // SAFETY: sigtimedwait(2) with a valid set, info and optional timeout.
        let (signal, sender) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let timeout_ptr = timeout
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            let signal = libc::sigtimedwait(&set, &mut info, timeout_ptr);
            (signal, info.si_pid() as u32)
        };
        match signal {
            // Timed out: the SIGTERM stage is over.
            -1 if !killed && kill_at.is_some_and(|at| Instant::now() >= at) => {
                signal_group(libc::SIGKILL);
                killed = true;
            }
            libc::SIGCHLD => {}
            SUPERVISOR_PDEATHSIG => {}
            SUPERVISOR_KILL_NOW if sender == parent => {
                signal_group(libc::SIGKILL);
                killed = true;
            }
            signal if STOP_SIGNALS.contains(&signal) && sender == parent => {
                signal_group(signal);
                kill_at.get_or_insert(Instant::now() + kill_after);
            }
            // A signal raised on the lock: COMMAND gets it, nothing stops.
            signal if sender == parent && signal > libc::SIGRTMIN() => {
                let i = (signal - libc::SIGRTMIN() - 1) as usize;
                if let Some(&(_, unix)) = PUSHED_SIGNALS.get(i) {
                    signal_group(unix);
                }
            }
            _ => {}
        }
    }
}

/// The supervisor's exit status: COMMAND's.
fn supervisor_exit(status: Option<libc::c_int>) -> ExitCode {
    match status {
        Some(status) if libc::WIFEXITED(status) => ExitCode::from(libc::WEXITSTATUS(status) as u8),
        Some(status) if libc::WIFSIGNALED(status) => {
            ExitCode::from(128u8.wrapping_add(libc::WTERMSIG(status) as u8))
        }
        _ => ExitCode::from(1),
    }
}
