//! What a run measured, and how it is shown: per-thread [`Stats`] merged at
//! the end, then a human table or one JSON object.
//!
//! Latencies are in microseconds in HDR histograms (3 significant figures),
//! one per operation type. Only operations completed inside the measured
//! window (after warm-up, before the stop) are counted; `violations` is
//! counted over the whole run, because a double grant is never acceptable.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Largest latency tracked: the hard cap on a run's length.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// The operation types with a latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Acquire,
    Release,
    Ping,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Acquire => "acquire",
            OpKind::Release => "release",
            OpKind::Ping => "ping",
        }
    }
}

/// Counters and histograms of one thread (then of the whole run, merged).
#[derive(Debug, Clone)]
pub struct Stats {
    pub acquire: Histogram<u64>,
    pub release: Histogram<u64>,
    pub ping: Histogram<u64>,
    /// Lock cycles (acquire granted + release done), or PING round trips.
    pub cycles: u64,
    /// Every reply to an acquire, release or ping (any outcome).
    pub ops: u64,
    /// `try` acquires that found the lock taken.
    pub busy: u64,
    /// Re-sent acquires of a client-side wait loop (RESP targets, `--mode wait`).
    pub retries: u64,
    /// Waiting acquires that gave up (`--wait-ms`).
    pub timeouts: u64,
    /// Releases the server said were not held by us (e.g. a Redis PX expired).
    pub lost: u64,
    /// Error replies, and connections lost during the run.
    pub errors: u64,
    /// Grants that conflicted with a hold another of our connections believed
    /// it had (see `holders`). Must be 0.
    pub violations: u64,
}

impl Stats {
    pub fn new() -> Stats {
        let histogram =
            || Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds");
        Stats {
            acquire: histogram(),
            release: histogram(),
            ping: histogram(),
            cycles: 0,
            ops: 0,
            busy: 0,
            retries: 0,
            timeouts: 0,
            lost: 0,
            errors: 0,
            violations: 0,
        }
    }

    pub fn histogram(&self, op: OpKind) -> &Histogram<u64> {
        match op {
            OpKind::Acquire => &self.acquire,
            OpKind::Release => &self.release,
            OpKind::Ping => &self.ping,
        }
    }

    pub fn record(&mut self, op: OpKind, latency_us: u64) {
        let histogram = match op {
            OpKind::Acquire => &mut self.acquire,
            OpKind::Release => &mut self.release,
            OpKind::Ping => &mut self.ping,
        };
        histogram.saturating_record(latency_us);
    }

    pub fn merge(&mut self, other: &Stats) {
        // Same bounds everywhere, so adding cannot fail.
        self.acquire
            .add(&other.acquire)
            .expect("same histogram bounds");
        self.release
            .add(&other.release)
            .expect("same histogram bounds");
        self.ping.add(&other.ping).expect("same histogram bounds");
        self.cycles += other.cycles;
        self.ops += other.ops;
        self.busy += other.busy;
        self.retries += other.retries;
        self.timeouts += other.timeouts;
        self.lost += other.lost;
        self.errors += other.errors;
        self.violations += other.violations;
    }
}

/// Everything the final report shows besides the measurements.
#[derive(Debug, Clone)]
pub struct Summary {
    pub target: String,
    pub protocol: &'static str,
    pub op: &'static str,
    pub mode: &'static str,
    pub connections: usize,
    pub threads: usize,
    pub pipeline: usize,
    pub keys: u32,
    pub distribution: &'static str,
    /// The Zipf exponent (None for uniform keys).
    pub zipf_s: Option<f64>,
    /// Seed of the key choices (give it back with --seed to repeat a run).
    pub seed: u64,
    pub hold_us: u64,
    pub shared_ratio: f64,
    pub rate: Option<f64>,
    pub warmup_secs: f64,
    /// The measured window: from the end of warm-up to the stop.
    pub duration_secs: f64,
    /// Connections that died during the run.
    pub connections_lost: usize,
    /// The first error reply or connection failure, to show the user.
    pub first_error: Option<String>,
    /// Operation types of this workload, in display order.
    pub op_kinds: Vec<OpKind>,
}

fn per_sec(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// `(p50, p90, p99, p99.9, max)` in µs; zeros for an empty histogram.
fn percentiles(h: &Histogram<u64>) -> [u64; 5] {
    if h.is_empty() {
        return [0; 5];
    }
    [
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.90),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ]
}

/// The human-readable table.
pub fn table(summary: &Summary, stats: &Stats) -> String {
    let s = summary;
    let mut out = String::new();
    let _ = writeln!(out, "target       {} ({})", s.target, s.protocol);
    let workload = if s.op == "ping" {
        "ping".to_string()
    } else {
        let shared = if s.shared_ratio > 0.0 {
            format!(", {:.0}% shared", s.shared_ratio * 100.0)
        } else {
            String::new()
        };
        let dist = match s.zipf_s {
            Some(zipf_s) => format!("zipf s={zipf_s}"),
            None => s.distribution.to_string(),
        };
        format!(
            "lock {}{shared}, {} keys {dist}, hold {} us",
            s.mode, s.keys, s.hold_us
        )
    };
    let _ = writeln!(out, "workload     {workload}");
    let rate = s.rate.map_or_else(
        || "closed loop".to_string(),
        |r| format!("open loop at {r} cycles/s"),
    );
    let _ = writeln!(
        out,
        "load         {} connections x pipeline {} on {} threads, {rate}",
        s.connections, s.pipeline, s.threads
    );
    let _ = writeln!(
        out,
        "duration     {:.2} s measured (+{:.2} s warm-up)",
        s.duration_secs, s.warmup_secs
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "cycles/s     {:>12.1}   ({} cycles)",
        per_sec(stats.cycles, s.duration_secs),
        stats.cycles
    );
    let _ = writeln!(
        out,
        "ops/s        {:>12.1}   ({} ops)",
        per_sec(stats.ops, s.duration_secs),
        stats.ops
    );
    let _ = writeln!(out, "busy         {:>12}", stats.busy);
    for (name, value) in [
        ("retries", stats.retries),
        ("timeouts", stats.timeouts),
        ("lost", stats.lost),
    ] {
        if value > 0 {
            let _ = writeln!(out, "{name:<12} {value:>12}");
        }
    }
    let _ = writeln!(out, "errors       {:>12}", stats.errors);
    let _ = writeln!(out, "violations   {:>12}", stats.violations);
    if s.connections_lost > 0 {
        let _ = writeln!(out, "conns lost   {:>12}", s.connections_lost);
    }
    if let Some(e) = &s.first_error {
        let _ = writeln!(out, "first error  {e}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency", "count", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"
    );
    for &op in &s.op_kinds {
        let h = stats.histogram(op);
        let [p50, p90, p99, p999, max] = percentiles(h);
        let _ = writeln!(
            out,
            "{:<10} {:>12} {p50:>9} {p90:>9} {p99:>9} {p999:>9} {max:>9}",
            op.name(),
            h.len()
        );
    }
    out
}

/// A JSON string literal.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON number (finite; non-finite values become 0).
fn json_f64(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "0".to_string()
    }
}

/// Exactly one JSON object, on one line.
pub fn json(summary: &Summary, stats: &Stats) -> String {
    let s = summary;
    let mut out = String::from("{");
    let field = |out: &mut String, name: &str, value: &str| {
        if out.len() > 1 {
            out.push(',');
        }
        json_str(out, name);
        out.push(':');
        out.push_str(value);
    };
    let quoted = |v: &str| {
        let mut q = String::new();
        json_str(&mut q, v);
        q
    };
    field(&mut out, "target", &quoted(&s.target));
    field(&mut out, "protocol", &quoted(s.protocol));
    field(&mut out, "op", &quoted(s.op));
    field(&mut out, "mode", &quoted(s.mode));
    field(
        &mut out,
        "cycles_per_sec",
        &json_f64(per_sec(stats.cycles, s.duration_secs)),
    );
    field(
        &mut out,
        "ops_per_sec",
        &json_f64(per_sec(stats.ops, s.duration_secs)),
    );
    field(&mut out, "cycles", &stats.cycles.to_string());
    field(&mut out, "ops_total", &stats.ops.to_string());
    field(&mut out, "busy", &stats.busy.to_string());
    field(&mut out, "retries", &stats.retries.to_string());
    field(&mut out, "timeouts", &stats.timeouts.to_string());
    field(&mut out, "lost", &stats.lost.to_string());
    field(&mut out, "errors", &stats.errors.to_string());
    field(&mut out, "violations", &stats.violations.to_string());
    field(&mut out, "duration_secs", &json_f64(s.duration_secs));
    field(&mut out, "warmup_secs", &json_f64(s.warmup_secs));
    field(&mut out, "connections", &s.connections.to_string());
    field(
        &mut out,
        "connections_lost",
        &s.connections_lost.to_string(),
    );
    field(&mut out, "threads", &s.threads.to_string());
    field(&mut out, "pipeline", &s.pipeline.to_string());
    field(&mut out, "keys", &s.keys.to_string());
    field(&mut out, "distribution", &quoted(s.distribution));
    field(
        &mut out,
        "zipf_s",
        &s.zipf_s.map_or_else(|| "null".to_string(), json_f64),
    );
    field(&mut out, "seed", &s.seed.to_string());
    field(&mut out, "hold_us", &s.hold_us.to_string());
    field(&mut out, "shared_ratio", &json_f64(s.shared_ratio));
    field(
        &mut out,
        "rate",
        &s.rate.map_or_else(|| "null".to_string(), json_f64),
    );
    field(
        &mut out,
        "first_error",
        &s.first_error
            .as_deref()
            .map_or_else(|| "null".to_string(), quoted),
    );
    let mut ops = String::from("{");
    for (i, &op) in s.op_kinds.iter().enumerate() {
        let h = stats.histogram(op);
        let [p50, p90, p99, p999, max] = percentiles(h);
        if i > 0 {
            ops.push(',');
        }
        json_str(&mut ops, op.name());
        let _ = write!(
            ops,
            ":{{\"count\":{},\"p50_us\":{p50},\"p90_us\":{p90},\"p99_us\":{p99},\"p999_us\":{p999},\"max_us\":{max}}}",
            h.len()
        );
    }
    ops.push('}');
    field(&mut out, "ops", &ops);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            target: "redis://127.0.0.1:6379".into(),
            protocol: "redis",
            op: "lock",
            mode: "try",
            connections: 2,
            threads: 1,
            pipeline: 1,
            keys: 10,
            distribution: "uniform",
            zipf_s: None,
            seed: 42,
            hold_us: 0,
            shared_ratio: 0.0,
            rate: None,
            warmup_secs: 0.0,
            duration_secs: 2.0,
            connections_lost: 0,
            first_error: Some("ERR \"quoted\"\n".into()),
            op_kinds: vec![OpKind::Acquire, OpKind::Release],
        }
    }

    #[test]
    fn json_has_the_fields_and_escapes() {
        let mut stats = Stats::new();
        stats.cycles = 10;
        stats.ops = 21;
        stats.record(OpKind::Acquire, 100);
        stats.record(OpKind::Acquire, 300);
        let json = json(&summary(), &stats);
        assert!(json.starts_with('{') && json.ends_with('}'));
        assert!(!json.contains('\n'));
        for needle in [
            "\"target\":\"redis://127.0.0.1:6379\"",
            "\"cycles_per_sec\":5.000",
            "\"ops_per_sec\":10.500",
            "\"cycles\":10",
            "\"violations\":0",
            "\"rate\":null",
            "\"zipf_s\":null",
            "\"seed\":42",
            "\"first_error\":\"ERR \\\"quoted\\\"\\n\"",
            "\"acquire\":{\"count\":2,\"p50_us\":100,",
            "\"release\":{\"count\":0,\"p50_us\":0,",
        ] {
            assert!(json.contains(needle), "{needle} not in {json}");
        }
    }

    #[test]
    fn merge_adds_up() {
        let mut a = Stats::new();
        let mut b = Stats::new();
        a.record(OpKind::Ping, 5);
        b.record(OpKind::Ping, 7);
        b.violations = 1;
        a.merge(&b);
        assert_eq!(a.ping.len(), 2);
        assert_eq!(a.ping.max(), 7);
        assert_eq!(a.violations, 1);
        let table = table(&summary(), &a);
        assert!(table.contains("violations"));
    }
}
