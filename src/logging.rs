//! The server's log: `tracing` events to stderr, as text or JSON lines,
//! with timestamps and levels. The level names are Python logging's (as
//! LiveLock takes them in `LIVELOCK_LOGLEVEL`) plus TRACE.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `--log-level`: what is logged.
pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    match text.to_ascii_uppercase().as_str() {
        "TRACE" => Ok(LevelFilter::TRACE),
        "DEBUG" => Ok(LevelFilter::DEBUG),
        "INFO" => Ok(LevelFilter::INFO),
        "WARNING" | "WARN" => Ok(LevelFilter::WARN),
        "ERROR" | "CRITICAL" => Ok(LevelFilter::ERROR),
        _ => Err(format!(
            "{text:?} is not a log level (TRACE, DEBUG, INFO, WARNING, ERROR, CRITICAL)"
        )),
    }
}

/// `--log-format`: one line per event, for people or for log shippers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `2026-12-02T13:59:33.123456Z  INFO livelock::server: listening on ...`
    Text,
    /// One JSON object per line: timestamp, level, target, fields.message and the event's fields.
    Json,
}

/// Installs the process-wide subscriber. The log store's own messages
/// (raft-engine logs through the `log` facade) come in as events of target
/// `raft_engine` and are kept from WARN up only: at INFO it narrates every
/// start.
pub fn init(level: LevelFilter, format: Format) {
    let filter = Targets::new()
        .with_default(level)
        .with_target("raft_engine", level.min(LevelFilter::WARN));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (never in this binary) keeps the first.
    let _ = match format {
        Format::Text => registry.with(layer).try_init(),
        Format::Json => registry.with(layer.json()).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_level_names_are_taken() {
        assert_eq!(parse_level("warning"), Ok(LevelFilter::WARN));
        assert_eq!(parse_level("CRITICAL"), Ok(LevelFilter::ERROR));
        assert_eq!(parse_level("Debug"), Ok(LevelFilter::DEBUG));
        assert!(parse_level("loud").unwrap_err().contains("TRACE, DEBUG"));
    }
}
