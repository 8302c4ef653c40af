//! Where logs go: journald (with structured fields) under systemd, plain text on stderr otherwise, and
//! optionally a rolling file.
//!
//! Owns the subscriber set-up. Under systemd (`JOURNAL_STREAM` set and journald reachable) events go to
//! journald natively, every span and event field becoming a journal field: `STREAM`, `GROUP`, `CONSUMER`,
//! `MESSAGE_ID`, `HANDLER`, `OUTCOME`, `TRACE_ID` — so `journalctl -u redstream GROUP=workers` filters. A
//! file, when configured, is written by a background thread (tracing-appender) that never blocks the
//! daemon: lines it cannot keep up with are dropped and counted ([`dropped_lines`]). The level comes from
//! `log.level`, and `RUST_LOG` overrides it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{Builder, Rotation};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Text from outside — a guest's log line, a message's `_trace_id` — made safe for a log line:
/// control characters (a newline that would start a forged line) escaped, cut at `max` bytes.
pub fn escape(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    let mut out: String = text.chars().flat_map(char::escape_debug).collect();
    if bytes.len() > max {
        out.push('…');
    }
    out
}

/// The `[log]` settings.
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// A level or filter such as `info,redstream=debug`.
    pub level: String,
    /// A directory to write rolling log files to, if any.
    pub dir: Option<PathBuf>,
    /// `daily`, `hourly` or `never`.
    pub rotation: String,
    /// Rotated files kept.
    pub keep: usize,
}

/// Keeps the file writer alive: dropping it flushes and stops the writer thread. Hold it until exit.
#[must_use = "dropping the guard stops the log file writer"]
pub struct LogGuard {
    _file: Option<WorkerGuard>,
}

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Lines the log file writer dropped because it could not keep up.
pub fn dropped_lines() -> usize {
    DROPPED.get().map_or(0, ErrorCounter::dropped_lines)
}

/// Installs the global subscriber. Fails only when the log directory cannot be used.
pub fn init(settings: &LogSettings) -> Result<LogGuard, String> {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));

    let journald = if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(layer) => Some(
                layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("redstream".into()),
            ),
            Err(e) => {
                eprintln!(
                    "redstream: JOURNAL_STREAM is set but journald is unreachable ({e}); logging to stderr"
                );
                None
            }
        }
    } else {
        None
    };
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });

    let (file, guard) = match &settings.dir {
        None => (None, None),
        Some(dir) => {
            let rotation = match settings.rotation.as_str() {
                "hourly" => Rotation::HOURLY,
                "never" => Rotation::NEVER,
                _ => Rotation::DAILY,
            };
            let appender = Builder::new()
                .rotation(rotation)
                .filename_prefix("redstream")
                .filename_suffix("log")
                .max_log_files(settings.keep.max(1))
                .build(dir)
                .map_err(|e| {
                    format!("log.dir: cannot write log files in {}: {e}", dir.display())
                })?;
            let (writer, guard) = NonBlockingBuilder::default().lossy(true).finish(appender);
            let _ = DROPPED.set(writer.error_counter());
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false);
            (Some(layer.with_filter(filter())), Some(guard))
        }
    };

    let _ = tracing_subscriber::registry()
        .with(journald.map(|l| l.with_filter(filter())))
        .with(stderr.map(|l| l.with_filter(filter())))
        .with(file)
        .try_init();
    Ok(LogGuard { _file: guard })
}
