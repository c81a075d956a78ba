//! livelock-loadgen: drives a lock server (livelock native, LiveLock RESP or
//! Redis locks) with one workload and reports cycles/s and HDR latency
//! percentiles, and checks along the way that no exclusive lock was granted
//! to two of its connections at once.
//!
//! This file owns the run as a whole: parse and validate the flags, start
//! the load threads (`engine`), wait until every connection is set up, start
//! them together, print progress each second, then merge the threads'
//! measurements and report them (`report`). Exit status: 0 success, 1
//! violations or an unreachable target, 2 bad arguments.

mod cli;
mod engine;
mod etcd;
mod holders;
mod keys;
mod report;
mod resp;
mod target;
mod timer;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::cli::{Args, Config, Invalid};
use crate::engine::{Op, Shared, ThreadReport, WaitMode};
use crate::report::{OpKind, Stats, Summary};
use crate::target::Proto;

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match args.validate() {
        Ok(config) => config,
        Err(Invalid::Usage(e)) => {
            eprintln!("livelock-loadgen: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(Invalid::Unreachable(e)) => {
            eprintln!("livelock-loadgen: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match run(config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("livelock-loadgen: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run(config: Config) -> Result<ExitCode, String> {
    let Config {
        target,
        plan,
        json,
        quiet,
    } = config;
    if plan.proto == Proto::Redis
        && plan.op == Op::Lock
        && plan.hold.as_millis() as u64 >= plan.ttl_ms
    {
        eprintln!(
            "livelock-loadgen: warning: --hold-us outlasts --ttl-ms, so Redis will expire held \
             locks (expect `lost` releases and violations)"
        );
    }
    let threads = plan.threads;
    let shared = Arc::new(Shared::new(plan));
    let mut handles = Vec::with_capacity(threads);
    for thread in 0..threads {
        let shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("loadgen-{thread}"))
            .spawn(move || engine::run_thread(&shared, thread))
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        handles.push(handle);
    }
    let plan = &shared.plan;
    let ready = shared
        .gate
        .wait_ready(threads, plan.setup_max + Duration::from_secs(5));
    if let Err(e) = ready {
        shared.gate.open(None);
        for handle in handles {
            let _ = handle.join();
        }
        return Err(format!("setting up connections to {target} failed: {e}"));
    }
    let start = Instant::now();
    shared.gate.open(Some(start));

    if !quiet {
        progress(&shared, &handles, start);
    }
    let mut reports = Vec::with_capacity(threads);
    for handle in handles {
        match handle.join() {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a load thread panicked".into()),
        }
    }
    let (summary, stats) = summarize(&target, &shared, start, &reports);
    if json {
        println!("{}", report::json(&summary, &stats));
    } else {
        print!("{}", report::table(&summary, &stats));
    }
    let _ = std::io::stdout().flush();
    let connections: usize = reports.iter().map(|r| r.connections).sum();
    if stats.violations > 0 {
        eprintln!(
            "livelock-loadgen: {} violation(s): a lock was granted while another of our \
             connections held it",
            stats.violations
        );
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    if summary.connections_lost == connections {
        eprintln!("livelock-loadgen: every connection to {target} was lost during the run");
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}

/// One line a second on stderr until the threads are done: rewritten in
/// place on a terminal, appended otherwise.
fn progress(
    shared: &Shared,
    handles: &[std::thread::JoinHandle<Result<ThreadReport, String>>],
    start: Instant,
) {
    let tty = std::io::stderr().is_terminal();
    let plan = &shared.plan;
    let mut last = [0u64; 2];
    let mut last_at = start;
    let mut next = start + Duration::from_secs(1);
    let mut printed = false;
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if now < next {
            continue;
        }
        next += Duration::from_secs(1);
        let sum = |f: fn(&engine::Progress) -> &std::sync::atomic::AtomicU64| {
            shared
                .progress
                .iter()
                .map(|p| f(p).load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let cycles = sum(|p| &p.cycles);
        let ops = sum(|p| &p.ops);
        let secs = now.duration_since(last_at).as_secs_f64();
        let elapsed = now.duration_since(start).as_secs_f64();
        let phase = if now < start + plan.warmup {
            "warm-up"
        } else {
            "run"
        };
        let line = format!(
            "[{elapsed:>6.1}s {phase:<7}] cycles/s {:>10.0}  ops/s {:>10.0}  busy {}  errors {}  violations {}",
            (cycles - last[0]) as f64 / secs,
            (ops - last[1]) as f64 / secs,
            sum(|p| &p.busy),
            sum(|p| &p.errors),
            sum(|p| &p.violations),
        );
        last = [cycles, ops];
        last_at = now;
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r{line}\x1b[K");
            printed = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
    if printed {
        eprintln!();
    }
}

fn summarize(
    target: &target::Target,
    shared: &Shared,
    start: Instant,
    reports: &[ThreadReport],
) -> (Summary, Stats) {
    let plan = &shared.plan;
    let mut stats = Stats::new();
    for r in reports {
        stats.merge(&r.stats);
    }
    let measure_start = start + plan.warmup;
    let stopped_at = reports
        .iter()
        .map(|r| r.stopped_at)
        .max()
        .unwrap_or(measure_start);
    let duration_secs = stopped_at
        .saturating_duration_since(measure_start)
        .as_secs_f64();
    let (op, op_kinds) = match plan.op {
        Op::Lock => ("lock", vec![OpKind::Acquire, OpKind::Release]),
        Op::Ping => ("ping", vec![OpKind::Ping]),
    };
    let protocol = match plan.proto {
        Proto::Native => "native",
        Proto::LiveLockResp => "livelock-resp",
        Proto::Redis => "redis",
        Proto::Etcd => "etcd",
    };
    let summary = Summary {
        target: target.to_string(),
        protocol,
        op,
        mode: match plan.wait {
            WaitMode::Try => "try",
            WaitMode::Wait => "wait",
        },
        connections: plan.connections,
        threads: plan.threads,
        pipeline: plan.pipeline,
        keys: plan.sampler.keys(),
        distribution: match plan.sampler {
            keys::KeySampler::Uniform { .. } => "uniform",
            keys::KeySampler::Zipf(_) => "zipf",
        },
        zipf_s: match &plan.sampler {
            keys::KeySampler::Zipf(z) => Some(z.exponent()),
            keys::KeySampler::Uniform { .. } => None,
        },
        seed: plan.seed,
        hold_us: plan.hold.as_micros() as u64,
        shared_ratio: plan.shared_ratio,
        rate: plan.rate,
        warmup_secs: plan.warmup.as_secs_f64(),
        duration_secs,
        connections_lost: reports.iter().map(|r| r.connections_lost).sum(),
        first_error: reports.iter().find_map(|r| r.first_error.clone()),
        op_kinds,
    };
    (summary, stats)
}
