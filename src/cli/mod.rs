//! The `redstream` command line: arguments, logging set-up, and exit codes (docs/design.md, "Operator surface").
//!
//! Owns what an operator types and what a script reads back: JSON lines where output feeds a program,
//! aligned text where a person reads it, and exit codes 0 (done), 1 (failed), 69 (Redis unavailable),
//! 78 (config error). The commands themselves are in [`commands`]; nothing here talks to Redis.

mod commands;
mod dev;
mod handler;
mod scaffold;
mod status;
mod stub;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::client::error::Error;
use crate::config::ConfigError;

/// Exit codes, from sysexits.h where one fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failure = 1,
    /// EX_UNAVAILABLE: Redis could not be reached.
    Unavailable = 69,
    /// EX_CONFIG: the config is invalid; systemd's RestartPreventExitStatus=78 stops restart loops.
    Config = 78,
}

/// A failed command: what to print, and how to exit.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::new(Exit::Config, e.to_string())
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let exit = match e {
            Error::Connection { .. } | Error::Timeout { .. } => Exit::Unavailable,
            _ => Exit::Failure,
        };
        Failure::new(exit, e.to_string())
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "redstream",
    version,
    about = "Turns Redis Streams into work: consumer groups, sandboxed handlers, authorized replies.",
    long_about = "Turns Redis Streams into work: consumer groups, sandboxed handlers, authorized replies.\n\n\
        Config is read from --config, else $REDSTREAM_CONFIG, else /etc/redstream/redstream.toml, and \
        REDSTREAM_* environment variables override it (REDSTREAM_REDIS__URL=redis://host:6379 sets \
        redis.url). Every stream operation runs as a verified identity: --token, else the daemon's own \
        identity from the config.\n\n\
        Exit codes: 0 done, 1 failed, 69 Redis unavailable, 78 config error.",
    after_help = "Stream names: nova:{domain}:{entity}:{function} (e.g. nova:task:boomerang:tasks) or the \
        legacy {service}.{name}.direct."
)]
pub struct Cli {
    /// Config file (default: $REDSTREAM_CONFIG, else /etc/redstream/redstream.toml).
    #[arg(short, long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consume every [[consumers]] group of the config until SIGTERM/SIGINT.
    #[command(
        long_about = "Run the daemon: consume every [[consumers]] group of the config until SIGTERM or \
        SIGINT.\n\nEach group gets one loop: it re-reads its own pending entries, then new ones; claims entries \
        idle longer than claim_min_idle from dead consumers; runs the handler; and commits the handler's \
        replies together with the ack, atomically. A stop signal ends reading and waits (up to \
        daemon.drain_timeout) for messages in flight to finish and commit; a second one exits at once. \
        Unfinished messages stay pending and are picked up at the next start.\n\nExit codes: 0 drained, \
        1 failed or stopped before draining, 69 Redis unavailable at start, 78 config error."
    )]
    Run,
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Validate the config: every key, secret and token key; exit 0 if usable, 78 naming each problem.
    Check {
        /// Also connect to Redis and PING it (exit 69 if it does not answer).
        #[arg(long)]
        redis: bool,
    },
    /// Publish one message; prints its entry id.
    #[command(
        after_help = "Examples:\n  redstream publish nova:task:boomerang:tasks type=task_created task_id=42\n  \
        echo '{\"task\":{\"id\":42}}' | redstream publish nova:task:boomerang:tasks --json -\n\n\
        Objects, arrays and null are stored as JSON text, other values as text; _timestamp, _source \
        and _trace_id are added (a given _trace_id is kept)."
    )]
    Publish {
        /// Stream to publish to.
        stream: String,
        /// Fields as NAME=VALUE; applied after --json, so they win.
        #[arg(value_name = "NAME=VALUE", value_parser = parse_field)]
        fields: Vec<(String, String)>,
        /// Read fields from a JSON object in FILE ("-" for standard input).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Trim the stream to about N entries (MAXLEN ~ N) in the same command.
        #[arg(long, value_name = "N")]
        maxlen: Option<u64>,
        /// Sign the message (_sig: bound to its fields and stream, used once, valid for
        /// auth.signature_ttl), as routes with require_sender_token want. Needs auth.signing_key.
        #[arg(long)]
        sign: bool,
        /// Hold the message and publish it this much later, e.g. 10m or 2h (moved onto the stream
        /// by a running daemon that may publish there, within 200 ms of its time).
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["sign", "maxlen", "at"])]
        delay: Option<std::time::Duration>,
        /// Hold the message until this time (RFC 3339, e.g. 2026-12-24T18:00:00Z).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak, conflicts_with_all = ["sign", "maxlen"])]
        at: Option<std::time::SystemTime>,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Send a signed command to the daemons on the control stream: status_request, reload_config
    /// or shutdown. Each daemon runs it once; a copy is refused. Needs auth.signing_key.
    Control {
        /// status_request, reload_config or shutdown.
        #[arg(value_parser = ["status_request", "reload_config", "shutdown"])]
        command: String,
        /// The daemon it is for (its server id: the identity name, with #instance), or all.
        #[arg(long, default_value = "all")]
        target: String,
        /// For status_request: echoed in the reply on the heartbeat stream.
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Read entries of a stream as JSON lines: {"id", "stream", "fields", "binary"}.
    Read {
        stream: String,
        /// How many entries at most.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Lowest id to include ("-" = the oldest; "(ID" excludes ID).
        #[arg(long, default_value = "-")]
        start: String,
        /// Highest id to include ("+" = the newest).
        #[arg(long, default_value = "+")]
        end: String,
        /// Newest first.
        #[arg(long)]
        reverse: bool,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// List the consumer groups of a stream.
    Groups {
        stream: String,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Show what a group has delivered but not acknowledged.
    Pending {
        stream: String,
        group: String,
        /// List entries (id, consumer, idle time, deliveries) instead of the summary.
        #[arg(long)]
        detail: bool,
        /// With --detail: how many entries at most.
        #[arg(long, default_value_t = 100)]
        count: u64,
        /// With --detail: only this consumer's entries.
        #[arg(long)]
        consumer: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// What the daemons are doing now: every configured group (consumers, pending, lag, messages,
    /// retries and dead letters per minute), handler p50/p99, and every daemon on the heartbeat
    /// stream (healthy, degraded, stopping or missing) — one screen, 100 columns.
    Status {
        /// Refresh every --interval until interrupted.
        #[arg(long)]
        watch: bool,
        /// JSON instead of text (one object per refresh).
        #[arg(long)]
        json: bool,
        /// How often --watch refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// List the streams you may read (SCAN … TYPE stream).
    Streams {
        /// Glob pattern of keys.
        #[arg(default_value = "*")]
        pattern: String,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Issue, verify and provision tokens and API keys.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a shell completion script: `redstream completions bash > /etc/bash_completion.d/redstream`.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page redstream(1), or with --out write one page per command into DIR
    /// (redstream.1, redstream-handler-new.1, …).
    Man {
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Try and measure WASM handlers locally, without Redis.
    #[command(subcommand)]
    Handler(HandlerCommand),
}

/// Which handler a local command runs, and with which settings.
#[derive(Debug, Args)]
pub struct HandlerArgs {
    /// The handler: a component (.wasm) or a project directory made by `handler new` (its built
    /// component, with the roles, limits and config of its handler.toml). With --handler it may be
    /// left out: the config entry's file is used.
    pub path: Option<PathBuf>,
    /// Take the roles, limits, config table and file of this [[handlers]] entry of --config.
    #[arg(long, value_name = "NAME")]
    pub handler: Option<String>,
    /// The handler's roles (repeatable), instead of its entry's; a bare .wasm gets admin, so every
    /// publish is allowed.
    #[arg(long = "role", value_name = "ROLE")]
    pub roles: Vec<String>,
    /// A value of the handler's config table, as KEY=VALUE (repeatable; over its entry's).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_field)]
    pub set: Vec<(String, String)>,
    /// The handler's memory limit (default: its entry's, else 64MiB).
    #[arg(long)]
    pub memory: Option<String>,
    /// The handler's deadline (default: its entry's, else 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
}

/// A handler call without Redis: the handler, its settings, and a message.
#[derive(Debug, Args)]
pub struct LocalCall {
    #[command(flatten)]
    pub target: HandlerArgs,
    /// The message's fields as a JSON object (objects and arrays become JSON text, as on publish).
    #[arg(long, value_name = "JSON")]
    pub message: String,
    /// The stream the message pretends to come from.
    #[arg(long, default_value = "nova:task:local:test")]
    pub stream: String,
    /// The delivery count the handler sees.
    #[arg(long, default_value_t = 1)]
    pub deliveries: u64,
}

#[derive(Debug, Subcommand)]
pub enum HandlerCommand {
    /// Start a handler project: a directory that builds anywhere, with the SDK, the WIT contract, an
    /// example test (cases.jsonl), a config entry to deploy it (handler.toml) and a README.
    #[command(
        after_help = "Example:\n  redstream handler new greeter --lang rust\n  \
        redstream handler build greeter && redstream handler test greeter\n  \
        redstream handler new fetcher --lang js --engine starlingmonkey"
    )]
    New {
        /// The handler's name: lowercase letters, digits and -, starting with a letter.
        name: String,
        /// rust (cargo, wasm32-wasip2), js (componentize-qjs or componentize-js, from npm) or python
        /// (componentize-py, from PyPI).
        #[arg(long, value_parser = ["rust", "js", "python"])]
        lang: String,
        /// For js: quickjs (componentize-qjs; small, about 50 µs a call) or starlingmonkey
        /// (componentize-js; `fetch` and `async` handlers, about ten times the cost a call).
        #[arg(long, value_parser = ["quickjs", "starlingmonkey"])]
        engine: Option<String>,
        /// Where to create the project directory NAME (default: the current directory).
        #[arg(long, value_name = "PATH")]
        dir: Option<PathBuf>,
    },
    /// Build a handler project with its language's toolchain (installing the pinned JS or Python
    /// one into the project on first use); prints where the component went and its size.
    Build {
        /// The project directory.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
    /// Run test cases against a handler: one JSON object per line, a message and what to expect
    /// (outcome, replies, reason). Exit 0 only when every case passes.
    #[command(
        after_help = "A case:\n  {\"name\": \"greets\", \"message\": {\"greet\": \"you\"}, \"expect\": \
        {\"outcome\": \"success\", \"replies\": [{\"stream\": \"nova:task:x:replies\", \"fields\": \
        {\"greeting\": \"hello, you\"}}]}}\n\nOptional: stream, id, deliveries; expect.reason, \
        expect.reason_contains."
    )]
    Test {
        #[command(flatten)]
        target: HandlerArgs,
        /// The cases (JSON lines; default: cases.jsonl of a project directory).
        #[arg(long, value_name = "FILE")]
        cases: Option<PathBuf>,
    },
    /// Call a handler once, in the same sandbox as `run`; print the outcome, the replies it would
    /// commit and what it logged and printed, as JSON. Exit 0 when it succeeded, 1 when it asked for a
    /// retry, rejected, or trapped.
    #[command(
        after_help = "Examples:\n  redstream handler run handlers/build/echo.wasm \\\n    \
        --message '{\"_reply_to\":\"nova:task:demo:replies\",\"text\":\"hi\"}'\n  \
        redstream --config /etc/redstream/redstream.toml handler run --handler greeter --message '{\"greet\":\"you\"}'"
    )]
    Run(LocalCall),
    /// Run a handler project in a local pipeline and keep it current: build, run cases.jsonl,
    /// deploy by its handler.toml into a daemon on a private redis-server (or --redis), print the
    /// entries of its streams and the daemon's log; rebuild, test and redeploy on every change.
    /// Ctrl-C stops everything it started.
    #[command(
        after_help = "Example:\n  redstream handler new greeter --lang rust && redstream handler dev greeter --send\n\n\
        In another terminal, as the author (a token with the roles of the handler's streams):\n  \
        . greeter/.redstream-dev/env && redstream publish nova:task:greeter:requests greet=you"
    )]
    Dev {
        /// The project directory.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Use this Redis instead of starting a private redis-server.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// Publish the message of the first case in cases.jsonl at start and after every redeploy.
        #[arg(long)]
        send: bool,
    },
    /// Measure the cost of one call with a fresh instance per message and with a reused instance.
    Bench {
        #[command(flatten)]
        call: LocalCall,
        /// Calls per mode.
        #[arg(long, default_value_t = 20_000)]
        n: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters as JSON lines: id, source (stream/id), reason, deliveries, handler, fields.
    List {
        /// The dead-letter stream (by default `<stream>-dlq` of the consumed stream).
        stream: String,
        #[arg(long, default_value_t = 100)]
        count: u64,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// Publish dead letters again to the stream the dead-letter stream belongs to (by the config, or
    /// the <stream>-dlq rule; an entry whose _dlq_source names another stream is refused), with new
    /// ids and _dlq_replayed_from, and remove them from the dead-letter stream.
    Replay {
        stream: String,
        /// Dead-letter ids to replay.
        #[arg(long = "id", value_name = "ID", required_unless_present = "all")]
        ids: Vec<String>,
        /// Replay every dead letter of the stream.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[command(flatten)]
        auth: AuthArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Exchange an API key for a signed JWT; prints the token.
    Issue {
        /// The API key: `-` reads it from stdin. Better: $REDSTREAM_API_KEY or --api-key-file — a key
        /// typed here is readable by every local user (/proc/PID/cmdline), and is refused.
        #[arg(
            long,
            env = "REDSTREAM_API_KEY",
            hide_env_values = true,
            value_name = "KEY"
        )]
        api_key: Option<String>,
        /// Read the API key from this file.
        #[arg(long, value_name = "PATH", conflicts_with = "api_key")]
        api_key_file: Option<std::path::PathBuf>,
        /// Lifetime, e.g. 15m or 8h (default auth.token_ttl, at most auth.max_token_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Ask for only these roles (default: all the key may have).
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
    },
    /// Verify a token against the configured keys; prints its identity and roles as JSON.
    Verify {
        /// The JWT; `-` reads it from stdin, and without it $REDSTREAM_TOKEN is used. (On the command
        /// line it is readable by every local user: it is used, with a warning.)
        #[arg(value_name = "JWT")]
        token: Option<String>,
        /// Read the JWT from this file.
        #[arg(long, value_name = "PATH", conflicts_with = "token")]
        token_file: Option<std::path::PathBuf>,
    },
    /// Generate a new API key; prints it once, with the config entry that stores only its hash.
    NewApiKey {
        /// Name of the config entry, for logs.
        #[arg(long)]
        name: String,
        /// The identity tokens for this key will carry.
        #[arg(long)]
        identity: String,
        /// Roles this key may be issued.
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
    },
}

/// Who performs a stream operation.
#[derive(Debug, Args)]
pub struct AuthArgs {
    /// Act as the identity in this JWT instead of the daemon's own. `-` reads it from stdin. (On the
    /// command line it is readable by every local user through /proc: prefer --token-file, `-` or
    /// $REDSTREAM_TOKEN.)
    #[arg(
        long,
        env = "REDSTREAM_TOKEN",
        hide_env_values = true,
        value_name = "JWT"
    )]
    pub token: Option<String>,
    /// Read the JWT to act as from this file.
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    pub token_file: Option<std::path::PathBuf>,
}

impl AuthArgs {
    /// The token to act as, from wherever it was given; a token typed on the command line is used,
    /// with a warning.
    pub fn resolve(&self) -> Result<Option<String>, String> {
        secret_input(
            self.token.as_deref(),
            self.token_file.as_deref(),
            "REDSTREAM_TOKEN",
            "--token",
            Typed::Warn,
        )
    }
}

/// What to do with a secret typed on the command line, where every local user can read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Typed {
    /// Use it, and say so on stderr (a token: short-lived).
    Warn,
    /// Refuse it (an API key: long-lived).
    Refuse,
}

/// A secret given as `-` (stdin), a file, the environment variable `env` (clap hands its value over
/// as if typed), or typed on the command line, which `typed` decides about: `what` names the option.
pub fn secret_input(
    given: Option<&str>,
    file: Option<&std::path::Path>,
    env: &str,
    what: &str,
    typed: Typed,
) -> Result<Option<String>, String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{what}-file {}: {e}", path.display()))?;
        return Ok(Some(text.trim().to_owned()));
    }
    let advice = format!(
        "{what} given on the command line is readable by every local user (/proc/PID/cmdline): \
         use {what}-file PATH, {what} - (stdin) or ${env}"
    );
    match given {
        None => Ok(None),
        Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| format!("{what} -: cannot read stdin: {e}"))?;
            Ok(Some(text.trim().to_owned()))
        }
        Some(v) if std::env::var(env).ok().as_deref() == Some(v) => Ok(Some(v.to_owned())),
        Some(v) => match typed {
            Typed::Refuse => Err(advice),
            Typed::Warn => {
                eprintln!("redstream: warning: {advice}");
                Ok(Some(v.to_owned()))
            }
        },
    }
}

fn parse_field(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, found {s:?}")),
    }
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run = cli.command {
        return daemon(cli.config.as_deref());
    }
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "redstream", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { out } => return man(out.as_deref()),
        _ => {}
    }
    init_logging("warn");
    // Handler calls use WASI's synchronous bindings, which must not run inside an async runtime.
    if let Command::Handler(cmd) = cli.command {
        let result = match cmd {
            HandlerCommand::Dev { path, redis, send } => match cli.config.as_deref() {
                Some(file) => Err(Failure::new(
                    Exit::Failure,
                    format!(
                        "handler dev writes its own config (it does not deploy into {}); give --redis URL to use another Redis",
                        file.display()
                    ),
                )),
                None => dev::dev(&path, redis.as_deref(), send),
            },
            cmd => handler::run(cli.config.as_deref(), cmd),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => {
                eprintln!("redstream: {}", f.message);
                ExitCode::from(f.exit as u8)
            }
        };
    }
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("redstream: {}", f.message);
            ExitCode::from(f.exit as u8)
        }
    }
}

/// `redstream run`: config, logging at the configured level, a multi-threaded runtime, the engine.
fn daemon(config: Option<&std::path::Path>) -> ExitCode {
    let settings = match crate::config::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("redstream: {e}");
            return ExitCode::from(Exit::Config as u8);
        }
    };
    if settings.consumers.is_empty() {
        eprintln!("redstream: consumers: nothing to run; declare at least one [[consumers]] entry");
        return ExitCode::from(Exit::Config as u8);
    }
    let _log = match crate::logging::init(&settings.log) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("redstream: {e}");
            return ExitCode::from(Exit::Config as u8);
        }
    };
    for w in &settings.warnings {
        tracing::warn!(key = %w.path, "config: {}", w.message);
    }
    let prepared = match crate::daemon::prepare(&settings) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("redstream: {e}");
            return ExitCode::from(Exit::Config as u8);
        }
    };
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(crate::daemon::run(settings, prepared));
    // Handler tasks still running after a forced stop are abandoned, not awaited.
    runtime.shutdown_background();
    let exit = match result {
        Ok(crate::daemon::Stopped::Drained) => Exit::Ok,
        Ok(_) => Exit::Failure,
        Err(crate::daemon::RunError::Unavailable(e)) => {
            tracing::error!(error = %e, "redis unavailable at start");
            Exit::Unavailable
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot run");
            Exit::Failure
        }
    };
    ExitCode::from(exit as u8)
}

/// `redstream man`: redstream(1) on stdout, or every command's page into `out`.
fn man(out: Option<&std::path::Path>) -> ExitCode {
    let cmd = <Cli as clap::CommandFactory>::command();
    let written = match out {
        Some(dir) => std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(cmd, dir)),
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redstream: cannot write the manual: {e}");
            ExitCode::from(Exit::Failure as u8)
        }
    }
}

/// Builds an async runtime, or says why not.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("redstream: cannot start the async runtime: {e}");
        ExitCode::from(Exit::Failure as u8)
    })
}

/// Logs to stderr at `default` (a level or filter); `RUST_LOG` overrides it. No colour unless stderr
/// is a terminal.
fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
