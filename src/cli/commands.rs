//! What each `redstream` command does, on top of the library.
//!
//! Owns loading the config once per command, picking the identity a command acts as, and formatting
//! output. Every stream operation goes through [`crate::client::Client`], so the CLI can do nothing the
//! identity's roles do not allow.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{AuthArgs, Cli, Command, DlqCommand, Exit, Failure, TokenCommand};
use crate::auth::apikey;
use crate::auth::{Identity, Roles};
use crate::client::delayed::Due;
use crate::client::{Client, PendingQuery, PublishOptions, ReadOptions};
use crate::client::{Error, redact_url, wait_ready};
use crate::config::{self, Settings};
use crate::model::dead_letter as dlq;
use crate::model::envelope::Fields;

type Result<T = ()> = std::result::Result<T, Failure>;

pub async fn run(cli: Cli) -> Result {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Check { redis } => check(config, redis).await,
        Command::Publish {
            stream,
            fields,
            json,
            maxlen,
            sign,
            delay,
            at,
            auth,
        } => {
            let due = match (delay, at) {
                (Some(d), _) => Some(Due::In(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
                (None, Some(t)) => Some(Due::At(
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                )),
                (None, None) => None,
            };
            let opts = PublishOptions { maxlen };
            publish(config, stream, fields, json, opts, sign, due, auth).await
        }
        Command::Control {
            command,
            target,
            request_id,
            auth,
        } => control(config, command, target, request_id, auth).await,
        Command::Read {
            stream,
            count,
            start,
            end,
            reverse,
            auth,
        } => read(config, stream, count, start, end, reverse, auth).await,
        Command::Groups { stream, json, auth } => groups(config, stream, json, auth).await,
        Command::Pending {
            stream,
            group,
            detail,
            count,
            consumer,
            json,
            auth,
        } => {
            pending(
                config,
                stream,
                group,
                detail.then_some(PendingQuery {
                    count,
                    consumer,
                    ..PendingQuery::default()
                }),
                json,
                auth,
            )
            .await
        }
        Command::Status {
            watch,
            json,
            interval,
            auth,
        } => status(config, watch, json, interval, auth).await,
        Command::Streams { pattern, auth } => streams(config, pattern, auth).await,
        Command::Token(cmd) => token(config, cmd).await,
        Command::Dlq(DlqCommand::List {
            stream,
            count,
            auth,
        }) => dlq_list(config, stream, count, auth).await,
        Command::Dlq(DlqCommand::Replay {
            stream,
            ids,
            all,
            auth,
        }) => dlq_replay(config, stream, ids, all, auth).await,
        Command::Run | Command::Handler(_) | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!(
                "`run`, `handler`, `completions` and `man` are dispatched before the one-shot runtime starts"
            )
        }
    }
}

/// `redstream publish`: one entry, signed with `--sign`, or held until `due`.
#[allow(clippy::too_many_arguments)]
async fn publish(
    config: Option<&Path>,
    stream: String,
    fields: Vec<(String, String)>,
    json: Option<PathBuf>,
    opts: PublishOptions,
    sign: bool,
    due: Option<Due>,
    auth: AuthArgs,
) -> Result {
    let settings = config::load(config)?;
    let client = connect_with(&settings, given_token(&auth)?.as_deref()).await?;
    let mut all = match json {
        Some(path) => json_fields(&path)?,
        None => Fields::new(),
    };
    for (name, value) in fields {
        all.set(&name, value);
    }
    if let Some(due) = due {
        let at = client.publish_delayed(&stream, all, due).await?;
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at);
        println!(
            "held for {stream} until {} (a running daemon that may publish there moves it then)",
            humantime::format_rfc3339_millis(when)
        );
        return Ok(());
    }
    let id = if sign {
        let token = given_token(&auth)?;
        publish_signed(&settings, &client, token.as_deref(), &stream, all, opts).await?
    } else {
        client.publish(&stream, all, opts).await?
    };
    println!("{id}");
    Ok(())
}

/// `redstream control`: a signed command on the control stream.
async fn control(
    config: Option<&Path>,
    command: String,
    target: String,
    request_id: Option<String>,
    auth: AuthArgs,
) -> Result {
    let settings = config::load(config)?;
    let stream = settings
        .control
        .as_ref()
        .map(|c| c.stream.clone())
        .ok_or_else(|| Failure::new(Exit::Config, "control.enabled: the control stream is off"))?;
    let client = connect_with(&settings, given_token(&auth)?.as_deref()).await?;
    let mut fields = Fields::new();
    fields.push("type", command.as_str());
    fields.push(crate::daemon::control::TARGET, target.as_str());
    if let Some(r) = request_id {
        fields.push("request_id", r);
    }
    let token = given_token(&auth)?;
    let opts = PublishOptions::default();
    let id = publish_signed(&settings, &client, token.as_deref(), &stream, fields, opts).await?;
    println!("{id}");
    Ok(())
}

/// `redstream read`: entries as JSON lines.
async fn read(
    config: Option<&Path>,
    stream: String,
    count: u64,
    start: String,
    end: String,
    reverse: bool,
    auth: AuthArgs,
) -> Result {
    let client = connect(config, given_token(&auth)?.as_deref()).await?;
    let opts = ReadOptions {
        count: Some(count),
        start,
        end,
        reverse,
    };
    let entries = client.read(&stream, &opts).await?;
    let mut out = std::io::stdout().lock();
    for e in entries {
        writeln!(out, "{}", e.to_json(&stream)).map_err(io_failure)?;
    }
    Ok(())
}

/// `redstream groups`: a stream's consumer groups.
async fn groups(config: Option<&Path>, stream: String, json: bool, auth: AuthArgs) -> Result {
    let client = connect(config, given_token(&auth)?.as_deref()).await?;
    let groups = client.groups(&stream).await?;
    if json {
        for g in &groups {
            println!(
                "{}",
                serde_json::to_string(g).expect("plain struct serializes")
            );
        }
    } else if groups.is_empty() {
        println!("{stream} has no consumer groups");
    } else {
        println!(
            "{:<24} {:>9} {:>8} {:>6}  LAST-DELIVERED",
            "GROUP", "CONSUMERS", "PENDING", "LAG"
        );
        for g in &groups {
            let lag = g.lag.map_or("?".to_string(), |l| l.to_string());
            println!(
                "{:<24} {:>9} {:>8} {:>6}  {}",
                g.name, g.consumers, g.pending, lag, g.last_delivered_id
            );
        }
    }
    Ok(())
}

/// `redstream pending`: a group's pending entries, summed up or one by one (`detail`).
/// (`detail`: one row per entry, as this query asks.)
async fn pending(
    config: Option<&Path>,
    stream: String,
    group: String,
    detail: Option<PendingQuery>,
    json: bool,
    auth: AuthArgs,
) -> Result {
    let client = connect(config, given_token(&auth)?.as_deref()).await?;
    if let Some(q) = detail {
        let rows = client.pending(&stream, &group, &q).await?;
        if json {
            for r in &rows {
                println!(
                    "{}",
                    serde_json::to_string(r).expect("plain struct serializes")
                );
            }
        } else {
            println!(
                "{:<22} {:<28} {:>12} {:>10}",
                "ID", "CONSUMER", "IDLE", "DELIVERIES"
            );
            for r in &rows {
                let idle = humantime::format_duration(Duration::from_secs(r.idle_ms / 1000));
                println!(
                    "{:<22} {:<28} {:>12} {:>10}",
                    r.id,
                    r.consumer,
                    idle.to_string(),
                    r.deliveries
                );
            }
        }
    } else {
        let s = client.pending_summary(&stream, &group).await?;
        if json {
            println!(
                "{}",
                serde_json::to_string(&s).expect("plain struct serializes")
            );
        } else if s.count == 0 {
            println!("{stream} {group}: nothing pending");
        } else {
            println!(
                "{stream} {group}: {} pending ({} .. {})",
                s.count,
                s.min_id.as_deref().unwrap_or("?"),
                s.max_id.as_deref().unwrap_or("?")
            );
            for (c, n) in &s.consumers {
                println!("  {c:<28} {n:>8}");
            }
        }
    }
    Ok(())
}

/// `redstream status`: every group and daemon, once or refreshed (`watch`).
async fn status(
    config: Option<&Path>,
    watch: bool,
    json: bool,
    interval: Duration,
    auth: AuthArgs,
) -> Result {
    let settings = config::load(config)?;
    let client = connect_with(&settings, given_token(&auth)?.as_deref()).await?;
    // While watching, an outage is shown, not fatal: the screen it is for is the incident's.
    let mut unreachable_since: Option<u64> = None;
    loop {
        let report = match super::status::gather(&client, &settings).await {
            Ok(r) => {
                unreachable_since = None;
                r
            }
            Err(e) if watch && (e.is_transient() || e.is_missing_key()) => {
                let now = crate::model::envelope::now_ms();
                let since = *unreachable_since.get_or_insert(now);
                if json {
                    println!(
                        "{}",
                        json!({"error": e.to_string(), "unreachable_since_ms": since})
                    );
                } else {
                    print!("\x1b[H\x1b[2J");
                    println!(
                        "Redis unreachable since {} ({} s): {e}",
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(since)
                        ),
                        (now - since) / 1000
                    );
                }
                tokio::time::sleep(interval).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if json {
            println!(
                "{}",
                serde_json::to_string(&report).expect("plain structs serialize")
            );
        } else {
            if watch {
                // Home and clear, so each refresh replaces the last.
                print!("\x1b[H\x1b[2J");
            }
            print!("{}", super::status::render(&report));
        }
        if !watch {
            return Ok(());
        }
        // Until interrupted: Ctrl-C ends the process as usual.
        tokio::time::sleep(interval).await;
    }
}

/// `redstream streams`: the streams matching a pattern.
async fn streams(config: Option<&Path>, pattern: String, auth: AuthArgs) -> Result {
    let client = connect(config, given_token(&auth)?.as_deref()).await?;
    for s in client.list_streams(&pattern).await? {
        println!("{s}");
    }
    Ok(())
}

/// `redstream dlq list`: dead letters as JSON lines.
async fn dlq_list(config: Option<&Path>, stream: String, count: u64, auth: AuthArgs) -> Result {
    let client = connect(config, given_token(&auth)?.as_deref()).await?;
    let opts = ReadOptions {
        count: Some(count),
        ..ReadOptions::default()
    };
    let mut out = std::io::stdout().lock();
    for e in client.read(&stream, &opts).await? {
        writeln!(out, "{}", dlq::describe(&stream, &e)).map_err(io_failure)?;
    }
    Ok(())
}

/// `redstream dlq replay`: dead letters published again to their source.
async fn dlq_replay(
    config: Option<&Path>,
    stream: String,
    ids: Vec<String>,
    all: bool,
    auth: AuthArgs,
) -> Result {
    let settings = config::load(config)?;
    let to = replay_target(&settings, &stream)?;
    let client = connect_with(&settings, given_token(&auth)?.as_deref()).await?;
    let ids = if all {
        let opts = ReadOptions {
            count: None,
            ..ReadOptions::default()
        };
        client
            .read(&stream, &opts)
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect()
    } else {
        ids
    };
    // One refused entry (a forged _dlq_source) does not stop the others; the exit code says so.
    let mut refused = 0;
    for id in ids {
        match client.replay_dead_letter(&stream, &id, &to).await {
            Ok(new_id) => {
                println!("{}", json!({"dead_letter": id, "stream": to, "id": new_id}))
            }
            Err(e @ crate::client::Error::NotFound { .. }) if all => {
                eprintln!("redstream: {e}");
                refused += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if refused > 0 {
        return Err(Failure::new(
            Exit::Failure,
            format!("{refused} dead letter(s) of {stream} refused, left where they are"),
        ));
    }
    Ok(())
}

async fn check(config: Option<&Path>, ping: bool) -> Result {
    let settings = config::load(config)?;
    let file = settings
        .file
        .as_ref()
        .map_or("(no file; defaults and environment)".to_string(), |p| {
            p.display().to_string()
        });
    println!("config ok: {file}");
    match &settings.identity {
        Some(d) => println!(
            "  identity: {} with roles {} (token expires in {})",
            d.identity.subject,
            d.identity.roles,
            until(d.expires_at)
        ),
        None => println!(
            "  identity: none (stream commands need --token; run needs identity.token or identity.roles)"
        ),
    }
    println!("  domains: {}", settings.naming.domains().join(", "));
    // Compile and link every handler, resolve every route: a broken component is a config error.
    let prepared = crate::daemon::prepare(&settings)?;
    for h in &settings.handlers {
        let mode = h
            .reuse
            .map_or("fresh instance per message".to_string(), |n| {
                format!("reused, retired after {n}")
            });
        println!(
            "  handler: {} ({}) roles {}, {} MiB, {} deadline, {mode}",
            h.name,
            h.file.display(),
            h.roles,
            h.memory >> 20,
            humantime::format_duration(h.timeout)
        );
    }
    for d in &settings.dropins {
        println!("  drop-in: {}", d.display());
    }
    for r in &settings.routes {
        println!("  route: {} → {}", r.stream, r.action);
    }
    for c in &settings.consumers {
        let handler = c
            .handler
            .as_ref()
            .map_or("routes".to_string(), ToString::to_string);
        println!(
            "  consumer: {} group {} as {}: {handler} (dead letters to {})",
            c.stream, c.group, c.consumer, c.dead_letter
        );
        let cluster = !settings.redis.cluster.is_empty();
        for r in c.routes.iter().filter(|_| c.handler.is_none()) {
            println!(
                "    route: {} {} → {}{}",
                r.stream,
                predicates(&r.when),
                r.action,
                match &r.action {
                    crate::engine::router::Action::Forward(to) if cluster =>
                        format!(" ({})", guarantee(&c.stream, to)),
                    _ => String::new(),
                }
            );
        }
        if cluster {
            // Which commits stay one atomic script, and which replies go through the outbox.
            let same = crate::client::slot::hash_tag(&c.stream).map_or_else(
                || format!("the stream {} itself", c.stream),
                |tag| format!("streams tagged {{{tag}}}"),
            );
            println!(
                "    commit: replies to {same} (slot {}) atomic with the ack; replies to other \
                 slots effectively-once through the outbox {}; dead letters {}",
                crate::client::slot::of(&c.stream),
                crate::client::outbox::outbox_of(&c.stream),
                guarantee(&c.stream, &c.dead_letter)
            );
        }
    }
    drop(prepared);
    for w in &settings.warnings {
        println!("  warning: {w}");
    }
    if settings.redis.cluster.is_empty() {
        println!(
            "  redis: {} (one node: every commit is atomic with its ack)",
            redact_url(&settings.redis.url)
        );
    } else {
        let seeds: Vec<String> = settings
            .redis
            .cluster
            .iter()
            .map(|u| redact_url(u))
            .collect();
        println!("  redis: cluster, seeds {}", seeds.join(", "));
    }
    if ping {
        wait_ready(settings.redis.clone(), settings.startup_wait)
            .await
            .map_err(|e| match e {
                Error::InvalidConnection(m) => Failure::new(Exit::Config, m),
                e => e.into(),
            })?;
        println!("  redis answered PING");
    }
    Ok(())
}

/// On a cluster, how a write from `source` to `target` is committed.
fn guarantee(source: &str, target: &str) -> String {
    use crate::client::slot;
    if slot::of(source) == slot::of(target) {
        format!("atomic: {target} shares slot {}", slot::of(source))
    } else {
        format!(
            "through the outbox: {target} is in slot {}, the source in {}",
            slot::of(target),
            slot::of(source)
        )
    }
}

/// Loads the config, picks the identity and waits (once) for Redis.
/// The stream whose dead letters `dlq` holds: from the config (a consumer's or the control stream's
/// `dead_letter`), else from the naming rule `<stream>-dlq`. Never from an entry's own fields.
fn replay_target(settings: &Settings, dlq: &str) -> Result<String> {
    let mut owners: Vec<&str> = settings
        .consumers
        .iter()
        .filter(|c| c.dead_letter == dlq)
        .map(|c| &*c.stream)
        .chain(
            settings
                .control
                .iter()
                .filter(|c| c.dead_letter == dlq)
                .map(|c| c.stream.as_str()),
        )
        .collect();
    owners.sort_unstable();
    owners.dedup();
    match owners.as_slice() {
        [one] => return Ok(one.to_string()),
        [] => {}
        many => {
            return Err(Failure::new(
                Exit::Failure,
                format!(
                    "{dlq} is the dead-letter stream of several streams ({}); replay cannot tell \
                     where an entry belongs, so it refuses",
                    many.join(", ")
                ),
            ));
        }
    }
    dlq.strip_suffix("-dlq")
        .filter(|s| {
            matches!(
                settings.naming.parse(s),
                Ok(crate::model::naming::StreamName::Adapt { .. })
            )
        })
        .map(str::to_owned)
        .ok_or_else(|| {
            Failure::new(
                Exit::Failure,
                format!(
                    "{dlq}: no [[consumers]] entry of this config has it as dead_letter, and its name is \
                     not <stream>-dlq; replay cannot tell which stream it belongs to"
                ),
            )
        })
}

/// Publishes `fields` signed: with the signing key where this host holds it, else through the
/// credential exchange at `auth.endpoint`, as the holder of `token`.
async fn publish_signed(
    settings: &Settings,
    client: &Client,
    token: Option<&str>,
    stream: &str,
    fields: Fields,
    opts: PublishOptions,
) -> Result<String> {
    if settings.auth.keys.can_sign() {
        return Ok(client
            .publish_signed(stream, fields, &settings.auth.keys, opts)
            .await?);
    }
    let Some(socket) = &settings.auth.endpoint else {
        return Err(Failure::new(
            Exit::Config,
            "auth: signing a message needs auth.signing_key on this host, or auth.endpoint (the \
             credential exchange of a daemon that holds it)",
        ));
    };
    let token = token.ok_or_else(|| {
        Failure::new(
            Exit::Failure,
            "signing through the credential exchange acts as a token: give --token-file, --token - \
             or $REDSTREAM_TOKEN",
        )
    })?;
    let mut fields = client.prepare_signed(stream, fields)?;
    let digest = crate::auth::signature::digest(stream, &fields);
    let answer = crate::daemon::exchange::request(
        socket,
        "/sign",
        &json!({"token": token, "stream": stream, "digest": digest}),
    )
    .await
    .map_err(|e| Failure::new(Exit::Failure, format!("credential exchange: {e}")))?;
    let signature = answer["signature"].as_str().ok_or_else(|| {
        Failure::new(
            Exit::Failure,
            "credential exchange: no signature in its answer",
        )
    })?;
    fields.push(crate::auth::signature::FIELD, signature);
    Ok(client.publish_prepared(stream, &fields, opts).await?)
}

/// The token an operator gave (see [`super::AuthArgs::resolve`]).
fn given_token(auth: &super::AuthArgs) -> Result<Option<String>> {
    auth.resolve().map_err(|m| Failure::new(Exit::Failure, m))
}

async fn connect(config: Option<&Path>, token: Option<&str>) -> Result<Client> {
    connect_with(&config::load(config)?, token).await
}

async fn connect_with(settings: &Settings, token: Option<&str>) -> Result<Client> {
    let identity = acting_identity(settings, token)?;
    let client = Client::connect(settings.redis.clone(), settings.naming.clone(), identity)
        .map_err(|e| Failure::new(Exit::Config, format!("redis.url: {e}")))?;
    client.ping().await?;
    Ok(client)
}

/// `--token` if given (verified), else the daemon's identity from the config.
fn acting_identity(settings: &Settings, token: Option<&str>) -> Result<Identity> {
    if let Some(t) = token {
        return settings
            .auth
            .keys
            .verify(t.trim())
            .map(|v| v.identity)
            .map_err(|e| Failure::new(Exit::Failure, format!("--token: {e}")));
    }
    settings
        .identity
        .as_ref()
        .map(|d| d.identity.clone())
        .ok_or_else(|| {
            Failure::new(
                Exit::Config,
                "identity: no identity to act as; pass --token (or $REDSTREAM_TOKEN), or configure \
             identity.token, or identity.roles with auth.signing_key",
            )
        })
}

async fn token(config: Option<&Path>, cmd: TokenCommand) -> Result {
    match cmd {
        TokenCommand::Issue {
            api_key,
            api_key_file,
            ttl,
            roles,
        } => {
            let api_key = super::secret_input(
                api_key.as_deref(),
                api_key_file.as_deref(),
                "REDSTREAM_API_KEY",
                "--api-key",
                super::Typed::Refuse,
            )
            .map_err(|m| Failure::new(Exit::Failure, m))?
            .ok_or_else(|| {
                Failure::new(
                    Exit::Failure,
                    "no API key: set $REDSTREAM_API_KEY, or pass --api-key-file PATH or --api-key - (stdin)",
                )
            })?;
            let settings = config::load(config)?;
            let auth = &settings.auth;
            if !auth.keys.can_sign()
                && let Some(socket) = &auth.endpoint
            {
                // This host verifies only: the daemon that holds the key issues.
                let mut body = json!({"api_key": api_key, "roles": roles});
                if let Some(ttl) = ttl {
                    body["ttl"] = json!(humantime::format_duration(ttl).to_string());
                }
                let answer = crate::daemon::exchange::request(socket, "/token", &body)
                    .await
                    .map_err(|e| {
                        Failure::new(Exit::Failure, format!("credential exchange: {e}"))
                    })?;
                println!("{}", answer["token"].as_str().unwrap_or_default());
                return Ok(());
            }
            let exchange = crate::daemon::exchange::Exchange::new(auth, settings.naming.clone());
            let (token, _) = exchange
                .issue(&api_key, &roles, ttl)
                .map_err(|e| Failure::new(Exit::Failure, e))?;
            println!("{token}");
            Ok(())
        }
        TokenCommand::Verify { token, token_file } => {
            let token = super::AuthArgs {
                token: token.or_else(|| std::env::var("REDSTREAM_TOKEN").ok()),
                token_file,
            }
            .resolve()
            .map_err(|m| Failure::new(Exit::Failure, m))?
            .ok_or_else(|| {
                Failure::new(
                    Exit::Failure,
                    "no token: give it as - (stdin), --token-file PATH or $REDSTREAM_TOKEN",
                )
            })?;
            let settings = config::load(config)?;
            let v = settings
                .auth
                .keys
                .verify(token.trim())
                .map_err(crate::client::error::Error::from)?;
            let out = json!({
                "subject": v.identity.subject,
                "roles": v.identity.roles.to_strings(),
                "key_id": v.key_id,
                "expires_at": v.expires_at,
            });
            println!("{out}");
            Ok(())
        }
        TokenCommand::NewApiKey {
            name,
            identity,
            roles,
        } => {
            let parsed = Roles::parse(&roles)
                .map_err(|m| Failure::new(Exit::Failure, format!("--role: {m}")))?;
            let key = apikey::generate().map_err(|m| Failure::new(Exit::Failure, m))?;
            let roles_toml: Vec<Value> =
                parsed.to_strings().into_iter().map(Value::String).collect();
            println!("# API key (shown once; hand it to its owner, do not store it):");
            println!("#   {key}");
            println!("# config entry, storing only its hash:");
            println!("[[auth.api_keys]]");
            println!("name = {}", Value::String(name));
            println!("hash = \"{}\"", apikey::hash(&key));
            println!("identity = {}", Value::String(identity));
            println!("roles = {}", Value::Array(roles_toml));
            Ok(())
        }
    }
}

fn json_fields(path: &Path) -> Result<Fields> {
    let mut text = String::new();
    let read = if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    read.map_err(|e| Failure::new(Exit::Failure, format!("--json {}: {e}", path.display())))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(Fields::from_json_object(&map)),
        Ok(_) => Err(Failure::new(
            Exit::Failure,
            format!(
                "--json {}: expected a JSON object of fields",
                path.display()
            ),
        )),
        Err(e) => Err(Failure::new(
            Exit::Failure,
            format!("--json {}: {e}", path.display()),
        )),
    }
}

/// A route's field conditions as `check` shows them: `type=task_created, has id, no _token`.
fn predicates(when: &crate::engine::router::Predicates) -> String {
    let mut parts: Vec<String> = when
        .equals
        .iter()
        .map(|(f, v)| format!("{f}={}", String::from_utf8_lossy(v)))
        .collect();
    parts.extend(when.exists.iter().map(|f| format!("has {f}")));
    parts.extend(when.absent.iter().map(|f| format!("no {f}")));
    if parts.is_empty() {
        "(every message)".into()
    } else {
        format!("({})", parts.join(", "))
    }
}

fn until(epoch_secs: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    humantime::format_duration(Duration::from_secs(epoch_secs.saturating_sub(now))).to_string()
}

fn io_failure(e: std::io::Error) -> Failure {
    Failure::new(Exit::Failure, format!("writing output: {e}"))
}
