//! The command line: flags (clap) and their validation into a [`Plan`].
//! Every flag is bounded here, so a run always ends and never asks the
//! generator or the server for something absurd.

use std::time::Duration;

use livelock::duration::seconds_flag;

use clap::{Parser, ValueEnum};
use livelock::limits::{IN_FLIGHT_PER_SESSION_MAX, NAME_LEN_MAX, PASSWORD_LEN_MAX, WAIT_MS_MAX};

use crate::engine::{Op, Plan, WaitMode};
use crate::keys::KeySampler;
use crate::target::{self, Proto, Target, TargetError};

/// Longest run, warm-up included: every run is bounded.
pub const RUN_SECS_MAX: f64 = 600.0;
/// Most connections (each is a socket and a server session).
pub const CONNECTIONS_MAX: usize = 50_000;
/// Most load threads.
pub const THREADS_MAX: usize = 256;
/// Largest key space (the violation check keeps 4 bytes per key).
pub const KEYS_MAX: u32 = 10_000_000;
/// Longest hold of one lock.
pub const HOLD_US_MAX: u64 = 60_000_000;
/// Time allowed to connect and finish every handshake.
pub const SETUP_MAX: Duration = Duration::from_secs(10);

const _: () = assert!(CONNECTIONS_MAX as u32 <= crate::holders::CONN_ID_MAX);
const _: () = assert!(IN_FLIGHT_PER_SESSION_MAX < u16::MAX as usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Distribution {
    Uniform,
    Zipf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Acquire once; a taken lock is "busy".
    Try,
    /// Wait for the lock (server-side on livelock://, a retry loop on RESP targets).
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OpArg {
    /// Lock cycles: acquire, hold, release.
    Lock,
    /// PING round trips: the cost of I/O alone.
    Ping,
}

/// Load generator for lock servers, in the spirit of redis-benchmark: many
/// connections, pipelining, a key space with a uniform or Zipf popularity,
/// HDR latency percentiles and one-line JSON output.
#[derive(Debug, Parser)]
#[command(name = "livelock-loadgen", version, after_help = AFTER_HELP)]
pub struct Args {
    /// What to load: livelock://HOST[:PORT] or just HOST[:PORT] (native protocol),
    /// livelock-resp://HOST[:PORT] (LiveLock's RESP protocol),
    /// redis://HOST[:PORT] (SET NX PX + compare-and-delete) or
    /// etcd://HOST[:PORT] (etcd's lock API with a lease, through its HTTP gateway; --mode wait)
    /// [default: the livelock server of LIVELOCK_HOST and LIVELOCK_PORT, else 127.0.0.1:7873].
    pub target: Option<String>,
    /// Connections, spread over the threads.
    #[arg(short = 'c', long, default_value_t = 50)]
    pub connections: usize,
    /// Load threads, each running its own event loop [default: number of cores].
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Requests in flight per connection.
    #[arg(short = 'P', long, default_value_t = 1)]
    pub pipeline: usize,
    /// Size of the key space (lock names PREFIX0 .. PREFIX{N-1}).
    #[arg(short = 'k', long, default_value_t = 100_000)]
    pub keys: u32,
    /// How keys are drawn.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// Zipf exponent: P(rank k) is proportional to k^-s.
    #[arg(long, default_value_t = 0.99)]
    pub zipf_s: f64,
    /// Time a granted lock is held before its release (e.g. 2ms; plain number: microseconds).
    #[arg(long, default_value = "0", value_parser = micros)]
    pub hold_us: u64,
    /// Fraction of acquires in shared mode (livelock:// only).
    #[arg(long, default_value_t = 0.0)]
    pub shared_ratio: f64,
    /// livelock:// only: the keys are counting semaphores; each acquire takes W of their C permits (ACQUIRE_PERMITS).
    #[arg(long, value_name = "W/C", value_parser = permits)]
    pub permits: Option<(u32, u32)>,
    /// Acquire once (try) or wait for the lock.
    #[arg(long, value_enum, default_value_t = ModeArg::Try)]
    pub mode: ModeArg,
    /// With --mode wait: longest wait of one acquire (e.g. 2s; plain number: milliseconds) [default: forever].
    #[arg(long, value_parser = millis_u32)]
    pub wait_ms: Option<u32>,
    /// With --mode wait on RESP targets: back-off between attempts (e.g. 1ms; plain number: microseconds).
    #[arg(long, default_value = "1000", value_parser = micros)]
    pub retry_us: u64,
    /// redis:// only: the PX expiry of every lock key (e.g. 30s; plain number: milliseconds).
    #[arg(long, default_value = "30000", value_parser = millis)]
    pub ttl_ms: u64,
    /// Measured run time, after the warm-up (e.g. 5s, 1m30s; plain number: seconds).
    #[arg(short = 'd', long, default_value = "10", value_parser = seconds_flag)]
    pub duration: Duration,
    /// Stop after this many measured cycles (or at --duration, whichever first).
    #[arg(short = 'n', long)]
    pub cycles: Option<u64>,
    /// Load before measuring starts (e.g. 2s; plain number: seconds).
    #[arg(long, default_value = "0", value_parser = seconds_flag)]
    pub warmup: Duration,
    /// Open loop: target cycles per second over all connections; latency is
    /// measured from each cycle's intended start (coordinated omission corrected).
    #[arg(long)]
    pub rate: Option<f64>,
    /// The workload.
    #[arg(long, value_enum, default_value_t = OpArg::Lock)]
    pub op: OpArg,
    /// Prefix of every lock name.
    #[arg(long, default_value = "loadgen:")]
    pub key_prefix: String,
    /// Password for HELLO (native), PASS (LiveLock) or AUTH (Redis).
    #[arg(long, env = "LIVELOCK_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Speak TLS to a livelock target, trusting this CA (PEM); the target's host is the name its certificate must carry.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Allow a target that is not on a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Seed of the key choices [default: from the clock].
    #[arg(long)]
    pub seed: Option<u64>,
}

const AFTER_HELP: &str = "\
Examples:
  livelock-loadgen livelock://127.0.0.1:7873 --duration 5
  livelock-loadgen livelock://127.0.0.1:7873 --pipeline 16 --json
  livelock-loadgen redis://127.0.0.1:6379 --keys 1000 --distribution zipf
  livelock-loadgen etcd://127.0.0.1:2379 --mode wait
  livelock-loadgen livelock://127.0.0.1:7873 --op ping

Exit status: 0 success, 1 violations found or target unreachable, 2 bad arguments.";

/// A validated run: where, what, and how it is reported.
#[derive(Debug)]
pub struct Config {
    pub target: Target,
    pub plan: Plan,
    pub json: bool,
    pub quiet: bool,
}

/// Why the flags cannot be run.
#[derive(Debug)]
pub enum Invalid {
    /// A bad or refused flag or URL (exit status 2).
    Usage(String),
    /// The target's host does not resolve (exit status 1).
    Unreachable(String),
}

impl From<String> for Invalid {
    fn from(message: String) -> Invalid {
        Invalid::Usage(message)
    }
}

/// A duration flag counted in microseconds (`2ms`, or a plain number of µs).
fn micros(text: &str) -> Result<u64, String> {
    livelock::duration::parse(text, Duration::from_micros(1)).map(|d| d.as_micros() as u64)
}

/// A duration flag counted in milliseconds (`30s`, or a plain number of ms).
fn millis(text: &str) -> Result<u64, String> {
    livelock::duration::parse(text, Duration::from_millis(1)).map(|d| d.as_millis() as u64)
}

fn millis_u32(text: &str) -> Result<u32, String> {
    let ms = millis(text)?;
    u32::try_from(ms).map_err(|_| format!("{text:?} is too long (at most {} ms)", u32::MAX))
}

/// `--permits W/C`: W of C permits, 1 <= W <= C.
fn permits(text: &str) -> Result<(u32, u32), String> {
    let parsed = text
        .split_once('/')
        .and_then(|(w, c)| Some((w.parse::<u32>().ok()?, c.parse::<u32>().ok()?)));
    match parsed {
        Some((weight, capacity)) if (1..=capacity).contains(&weight) => Ok((weight, capacity)),
        _ => Err(format!("{text:?} is not W/C with 1 <= W <= C")),
    }
}

fn check(ok: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(message())
    }
}

impl Args {
    /// Checks every flag and resolves the target.
    pub fn validate(&self) -> Result<Config, Invalid> {
        let url = match &self.target {
            Some(url) => url.clone(),
            // The first of the environment's servers.
            None => livelock::address::servers_from_env(None)
                .map_err(Invalid::Usage)?
                .swap_remove(0),
        };
        let target = target::resolve(&url, self.allow_remote).map_err(|e| match e {
            TargetError::Bad(e) => Invalid::Usage(e),
            TargetError::Unresolved(e) => Invalid::Unreachable(e),
        })?;
        let proto = target.proto;
        check((1..=CONNECTIONS_MAX).contains(&self.connections), || {
            format!(
                "--connections must be 1..={CONNECTIONS_MAX}, got {}",
                self.connections
            )
        })?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = self.threads.unwrap_or(cores);
        check((1..=THREADS_MAX).contains(&threads), || {
            format!("--threads must be 1..={THREADS_MAX}, got {threads}")
        })?;
        let threads = threads.min(self.connections);
        check(
            (1..=IN_FLIGHT_PER_SESSION_MAX).contains(&self.pipeline),
            || {
                format!(
                    "--pipeline must be 1..={IN_FLIGHT_PER_SESSION_MAX}, got {}",
                    self.pipeline
                )
            },
        )?;
        let op = match self.op {
            OpArg::Lock => Op::Lock,
            OpArg::Ping => Op::Ping,
        };
        check((1..=KEYS_MAX).contains(&self.keys), || {
            format!("--keys must be 1..={KEYS_MAX}, got {}", self.keys)
        })?;
        if op == Op::Lock {
            check(self.pipeline <= self.keys as usize, || {
                format!(
                    "--pipeline {} needs at least as many --keys (got {}): the requests in \
                     flight on one connection name distinct locks",
                    self.pipeline, self.keys
                )
            })?;
        }
        check(
            self.zipf_s.is_finite() && self.zipf_s > 0.0 && self.zipf_s <= 10.0,
            || format!("--zipf-s must be in (0, 10], got {}", self.zipf_s),
        )?;
        let sampler = match self.distribution {
            Distribution::Uniform => KeySampler::uniform(self.keys),
            Distribution::Zipf => KeySampler::zipf(self.keys, self.zipf_s),
        };
        check(self.hold_us <= HOLD_US_MAX, || {
            format!(
                "--hold-us must be at most {HOLD_US_MAX}, got {}",
                self.hold_us
            )
        })?;
        check((0.0..=1.0).contains(&self.shared_ratio), || {
            format!(
                "--shared-ratio must be in 0.0..=1.0, got {}",
                self.shared_ratio
            )
        })?;
        check(self.shared_ratio == 0.0 || proto == Proto::Native, || {
            format!(
                "--shared-ratio needs a livelock:// target ({} has no shared locks)",
                proto.scheme()
            )
        })?;
        check(
            self.permits.is_none() || (proto == Proto::Native && self.shared_ratio == 0.0),
            || "--permits needs a livelock:// target, without --shared-ratio".into(),
        )?;
        let wait = match self.mode {
            ModeArg::Try => WaitMode::Try,
            ModeArg::Wait => WaitMode::Wait,
        };
        // etcd's lock call always waits in the server, with no deadline.
        let etcd_lock = proto == Proto::Etcd && op == Op::Lock;
        check(
            !etcd_lock || (wait == WaitMode::Wait && self.wait_ms.is_none()),
            || {
                "etcd:// has no try-lock and no wait limit: use --mode wait, without --wait-ms"
                    .into()
            },
        )?;
        if let Some(ms) = self.wait_ms {
            check(wait == WaitMode::Wait, || {
                "--wait-ms needs --mode wait".into()
            })?;
            check((1..=WAIT_MS_MAX).contains(&ms), || {
                format!("--wait-ms must be 1..={WAIT_MS_MAX}, got {ms}")
            })?;
        }
        check((1..=10_000_000).contains(&self.retry_us), || {
            format!("--retry-us must be 1..=10000000, got {}", self.retry_us)
        })?;
        check((1..=86_400_000).contains(&self.ttl_ms), || {
            format!("--ttl-ms must be 1..=86400000, got {}", self.ttl_ms)
        })?;
        let (duration, warmup) = (self.duration, self.warmup);
        check(!duration.is_zero(), || "--duration must be > 0".into())?;
        check((duration + warmup).as_secs_f64() <= RUN_SECS_MAX, || {
            format!(
                "--duration plus --warmup must be at most {RUN_SECS_MAX} s, got {:?}",
                duration + warmup
            )
        })?;
        if let Some(n) = self.cycles {
            check(n > 0, || "--cycles must be > 0".into())?;
        }
        let interval = match self.rate {
            None => None,
            Some(rate) => {
                check(rate.is_finite() && rate > 0.0 && rate <= 1e9, || {
                    format!("--rate must be in (0, 1e9] cycles/s, got {rate}")
                })?;
                Some(Duration::from_secs_f64(self.connections as f64 / rate))
            }
        };
        check(self.key_prefix.len() + 10 <= NAME_LEN_MAX, || {
            format!("--key-prefix is too long: names must stay within {NAME_LEN_MAX} bytes")
        })?;
        check(!self.key_prefix.contains(['\r', '\n']), || {
            "--key-prefix must not contain CR or LF".into()
        })?;
        if let Some(pw) = &self.password {
            check(pw.len() <= PASSWORD_LEN_MAX, || {
                format!("--password must be at most {PASSWORD_LEN_MAX} bytes")
            })?;
        }
        let tls = match &self.tls_ca {
            Some(ca) => {
                check(!matches!(proto, Proto::Redis | Proto::Etcd), || {
                    "--tls-ca needs a livelock:// or livelock-resp:// target".into()
                })?;
                // The name the certificate must carry: the target's host.
                let host = target
                    .authority
                    .rsplit_once(':')
                    .map_or(target.authority.as_str(), |(host, _)| host)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                Some(livelock::client::TlsClient::new(ca, host, None)?)
            }
            None => None,
        };
        let seed = self.seed.unwrap_or_else(clock_seed);
        let plan = Plan {
            proto,
            addr: target.addrs[0],
            host: target.authority.clone(),
            op,
            wait,
            wait_ms: self.wait_ms,
            retry: Duration::from_micros(self.retry_us),
            hold: Duration::from_micros(self.hold_us),
            ttl_ms: self.ttl_ms,
            shared_ratio: self.shared_ratio,
            permits: self.permits,
            sampler,
            key_prefix: self.key_prefix.as_bytes().to_vec(),
            password: self.password.as_ref().map(|p| p.as_bytes().to_vec()),
            tls,
            connections: self.connections,
            threads,
            pipeline: self.pipeline,
            rate: self.rate,
            interval,
            cycles_max: self.cycles,
            warmup,
            duration,
            seed,
            setup_max: SETUP_MAX,
        };
        Ok(Config {
            target,
            plan,
            json: self.json,
            quiet: self.quiet,
        })
    }
}

fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["livelock-loadgen"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&["livelock://127.0.0.1:7873"]).unwrap();
        let plan = config.plan;
        assert_eq!(plan.connections, 50);
        assert_eq!(plan.pipeline, 1);
        assert_eq!(plan.sampler.keys(), 100_000);
        assert_eq!(plan.duration, Duration::from_secs(10));
        assert!(plan.interval.is_none());
        assert!(!config.json);
    }

    #[test]
    fn refuses_bad_values() {
        for args in [
            &["livelock://127.0.0.1:1", "--connections", "0"][..],
            &["livelock://127.0.0.1:1", "--pipeline", "2000"],
            &["livelock://127.0.0.1:1", "--pipeline", "8", "--keys", "4"],
            &["livelock://127.0.0.1:1", "--zipf-s", "0"],
            &["livelock://127.0.0.1:1", "--shared-ratio", "1.5"],
            &["redis://127.0.0.1:1", "--shared-ratio", "0.5"],
            &["redis://127.0.0.1:1", "--permits", "1/2"],
            &["livelock://127.0.0.1:1", "--permits", "3/2"],
            &["livelock://127.0.0.1:1", "--permits", "0/2"],
            &["livelock://127.0.0.1:1", "--permits", "2"],
            &[
                "livelock://127.0.0.1:1",
                "--permits",
                "1/2",
                "--shared-ratio",
                "0.5",
            ],
            &["livelock://127.0.0.1:1", "--wait-ms", "10"],
            &["livelock://127.0.0.1:1", "--duration", "0"],
            &["livelock://127.0.0.1:1", "--duration", "601"],
            &[
                "livelock://127.0.0.1:1",
                "--duration",
                "500",
                "--warmup",
                "200",
            ],
            &["livelock://127.0.0.1:1", "--rate", "0"],
            &["livelock://127.0.0.1:1", "--cycles", "0"],
            &["livelock://192.0.2.1:7873"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        assert!(parse(&["livelock://192.0.2.1:7873", "--allow-remote"]).is_ok());
        // One duration syntax (issue 11, item 2): units, or plain seconds.
        let plan = parse(&[
            "livelock://127.0.0.1:1",
            "--duration",
            "1m30s",
            "--warmup",
            "500ms",
        ])
        .unwrap()
        .plan;
        assert_eq!(plan.duration, Duration::from_secs(90));
        assert_eq!(plan.warmup, Duration::from_millis(500));
        let plan = parse(&["livelock://127.0.0.1:1", "-d", "5"]).unwrap().plan;
        assert_eq!(plan.duration, Duration::from_secs(5));
        // Every duration flag, with units or in its documented plain unit.
        let plan = parse(&[
            "127.0.0.1:1",
            "--mode",
            "wait",
            "--hold-us",
            "2ms",
            "--retry-us",
            "250",
            "--wait-ms",
            "1.5s",
        ])
        .unwrap()
        .plan;
        assert_eq!(plan.hold, Duration::from_millis(2));
        assert_eq!(plan.retry, Duration::from_micros(250));
        assert_eq!(plan.wait_ms, Some(1500));
        let plan = parse(&["redis://127.0.0.1:1", "--ttl-ms", "30s", "--hold-us", "1"])
            .unwrap()
            .plan;
        assert_eq!(plan.ttl_ms, 30_000);
        assert_eq!(plan.hold, Duration::from_micros(1));
        assert!(parse(&["livelock://127.0.0.1:1", "--duration", "5x"]).is_err());
        assert!(parse(&[
            "livelock://127.0.0.1:1",
            "--pipeline",
            "8",
            "--keys",
            "4",
            "--op",
            "ping"
        ])
        .is_ok());
    }

    #[test]
    fn threads_never_exceed_connections() {
        let plan = parse(&["livelock://127.0.0.1:1", "-c", "1", "-t", "8"])
            .unwrap()
            .plan;
        assert_eq!(plan.threads, 1);
    }

    #[test]
    fn rate_becomes_a_per_connection_interval() {
        let plan = parse(&["livelock://127.0.0.1:1", "-c", "10", "--rate", "1000"])
            .unwrap()
            .plan;
        assert_eq!(plan.interval, Some(Duration::from_millis(10)));
    }
}
