//! `redstream handler dev`: a handler project's inner loop in one command — build, test, deploy into a
//! running local pipeline, and again on every change.
//!
//! Owns what the loop starts and stops. In the project's `.redstream-dev/` it writes a config (the
//! project's `handler.toml` as a drop-in, its component in the handlers directory, `wasm.watch` on, a
//! signing key and an API key for the author, all made up for this run), starts a private
//! `redis-server` on a unix socket there (unless `--redis URL`), `redstream run` on that config, and
//! exchanges the author's API key for a token (`.redstream-dev/env`, for `redstream publish` in another
//! terminal). Then each change of the project's sources rebuilds it, runs cases.jsonl and copies the new
//! component in — the daemon's watch reloads it exactly as in production — and every entry added to the
//! handler's streams is printed, with the daemon's log (the handler's own log lines among it). The
//! hosts cases.jsonl stubs are served on loopback (`super::stub`), and the entry's config URLs on them
//! pointed there in the deployed drop-in ([`redirect`]). Ctrl-C
//! (or SIGTERM) stops the daemon with a drain, then the redis-server, and nothing else: both are this
//! command's children, stopped by their pids (and killed with it should it be killed).
//!
//! Synchronous, like the other handler commands: cases run in WASI's synchronous bindings.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use notify::{EventKind, RecursiveMode, Watcher as _};
use serde_json::Value;

use super::scaffold::Project;
use super::{Exit, Failure, HandlerArgs};
use crate::config::Settings;

type Result<T = ()> = std::result::Result<T, Failure>;

/// How long nothing may change before a change is built (an editor writes a file in several steps).
const QUIET: Duration = Duration::from_millis(300);

/// Project paths whose changes are not the author's sources: build output, installed toolchains, this
/// loop's own files, and version control.
const NOT_SOURCES: &[&str] = &[
    "target",
    "dist",
    "node_modules",
    ".venv",
    "__pycache__",
    ".redstream-dev",
    ".git",
];

/// What the loop waits for.
enum Event {
    /// A source file changed.
    Changed(PathBuf),
    /// Ctrl-C or SIGTERM.
    Stop(i32),
    /// The daemon said it runs (true) or reloaded its config (false).
    Ready(bool),
    /// The daemon's log ended: it exited.
    DaemonGone,
}

/// The processes this command started; dropping it stops them.
#[derive(Default)]
struct Started {
    redis: Option<Child>,
    daemon: Option<Child>,
}

impl Started {
    fn stop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            stop_child(
                daemon,
                libc::SIGTERM,
                Duration::from_secs(15),
                "redstream run",
            );
        }
        if let Some(redis) = self.redis.take() {
            stop_child(redis, libc::SIGTERM, Duration::from_secs(5), "redis-server");
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `signal` to `child` and waits up to `grace` for it to exit, then kills it.
fn stop_child(mut child: Child, signal: i32, grace: Duration, what: &str) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    // SAFETY: kill(2) on the pid of a child we have not yet waited for, so not reused.
    unsafe { libc::kill(pid, signal) };
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "dev: {what} (pid {pid}) did not stop within {}; killing it",
        humantime::format_duration(grace)
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process of this command: no `REDSTREAM_*` of the author's environment (the dev config is
/// the whole config), logging to stderr, in its own process group, and killed if this command dies
/// without stopping it.
fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("REDSTREAM_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("LISTEN_FDS");
    // A process group of its own: Ctrl-C in the terminal reaches this command only, which then stops
    // the daemon (one SIGTERM, a drain) before the redis-server under it.
    cmd.process_group(0);
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Failure {
    move |e| Failure::new(Exit::Failure, format!("{what}: {e}"))
}

/// `redstream handler dev [PATH] [--redis URL] [--send]`.
pub fn dev(path: &Path, redis: Option<&str>, send: bool) -> Result {
    let dir = std::path::absolute(path).map_err(io(path.display()))?;
    let project = Project::open(&dir)?;
    let entry = dir.join("handler.toml");
    if !entry.is_file() {
        return Err(Failure::new(
            Exit::Failure,
            format!(
                "{} is missing: it says how the handler is deployed (its [[handlers]] entry and the [[consumers]] that feed it)",
                entry.display()
            ),
        ));
    }
    let (events, inbox) = mpsc::channel();
    let signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .map_err(io("cannot catch Ctrl-C"))?;
    spawn_signals(signals, events.clone());

    let work = dir.join(".redstream-dev");
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io(work.display()))?;
    }
    for d in [work.join("handlers"), work.join("redstream.d")] {
        std::fs::create_dir_all(&d).map_err(io(d.display()))?;
    }

    // The first build must succeed: there is nothing to deploy before it.
    super::scaffold::build(&dir)?;
    let cases = run_cases(&dir);

    let mut started = Started::default();
    let url = match redis {
        Some(url) => url.to_owned(),
        None => {
            let (child, url) = private_redis(&work)?;
            started.redis = Some(child);
            url
        }
    };
    let api_key = crate::auth::apikey::generate().map_err(|m| Failure::new(Exit::Failure, m))?;
    let config = work.join("redstream.toml");
    let mut stubs =
        super::stub::StubServer::start(&dir).map_err(io("cannot start the HTTP stubs"))?;
    let served = stubs
        .serve_stubbed()
        .map_err(io("cannot listen for the HTTP stubs"))?
        .clone();
    let mut redirected = deploy(&dir, &project, &work, &served)?;
    let settings = write_config(&project, &work, &url, &api_key)?;

    let exe = std::env::current_exe().map_err(io("cannot find this program"))?;
    let mut daemon = command(&exe)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("cannot start {} run", exe.display())))?;
    let log = daemon.stderr.take().expect("stderr is piped");
    let daemon_pid = daemon.id();
    started.daemon = Some(daemon);
    spawn_daemon_log(log, events.clone());
    if !wait_ready(&inbox, &mut started, Duration::from_secs(120))? {
        return Ok(());
    }

    let token = issue_token(&exe, &config, &api_key)?;
    let env_file = work.join("env");
    write_private(
        &env_file,
        &format!(
            "export REDSTREAM_CONFIG={}\nexport REDSTREAM_TOKEN={token}\n",
            shell_word(&config.display().to_string())
        ),
    )?;
    let first = first_case(&dir, &settings, &project.name);
    banner(
        &project,
        &url,
        started.redis.as_ref(),
        daemon_pid,
        &env_file,
        first.as_ref(),
        &redirected,
    );
    if let Err(failed) = cases {
        println!("dev: {failed}; deployed anyway");
    }
    spawn_tail(url, follow(&settings));
    let send_first = |dir: &Path| {
        if let Some((stream, message)) = first_case(dir, &settings, &project.name).or(first.clone())
        {
            publish(&exe, &config, &token, &stream, &message);
        }
    };
    if send {
        send_first(&dir);
    }

    let _watcher = watch(&dir, events)?;
    let mut awaiting_reload = false;
    loop {
        let event = inbox.recv().map_err(|_| {
            Failure::new(
                Exit::Failure,
                "dev: every event source ended; this is a bug",
            )
        })?;
        match event {
            Event::Stop(signal) => {
                println!("dev: stopping (signal {signal})");
                started.stop();
                return Ok(());
            }
            Event::DaemonGone => {
                started.stop();
                return Err(Failure::new(
                    Exit::Failure,
                    "dev: the daemon exited (its log is above); stopped",
                ));
            }
            Event::Ready(_) => {
                if std::mem::take(&mut awaiting_reload) && send {
                    send_first(&dir);
                }
            }
            Event::Changed(first) => {
                let changed = settle(&inbox, first, &mut started)?;
                println!("\ndev: {} changed: rebuilding", shown(&dir, &changed));
                if let Err(f) = super::scaffold::build(&dir) {
                    println!(
                        "dev: the build failed; the deployed handler stays\n{}",
                        f.message
                    );
                    continue;
                }
                let cases = run_cases(&dir)
                    .err()
                    .map(|f| format!(" ({f}: deployed anyway)"));
                let served = match stubs.serve_stubbed() {
                    Ok(served) => served.clone(),
                    Err(e) => {
                        println!("dev: cannot listen for the HTTP stubs: {e}");
                        continue;
                    }
                };
                match deploy(&dir, &project, &work, &served) {
                    Ok(now) => {
                        if now != redirected {
                            print_redirected(&now);
                            redirected = now;
                        }
                        println!(
                            "dev: deployed{}; the daemon reloads it",
                            cases.unwrap_or_default()
                        );
                        awaiting_reload = true;
                    }
                    Err(f) => println!("dev: {}", f.message),
                }
            }
        }
    }
}

/// Waits for the daemon to say it runs; false when stopped meanwhile.
fn wait_ready(
    inbox: &mpsc::Receiver<Event>,
    started: &mut Started,
    limit: Duration,
) -> Result<bool> {
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match inbox.recv_timeout(left) {
            Ok(Event::Ready(true)) => return Ok(true),
            Ok(Event::Stop(_)) => {
                started.stop();
                return Ok(false);
            }
            Ok(Event::DaemonGone) => {
                started.stop();
                return Err(Failure::new(
                    Exit::Failure,
                    "dev: the daemon exited at start (its log is above)",
                ));
            }
            Ok(_) => {}
            Err(_) => {
                started.stop();
                return Err(Failure::new(
                    Exit::Failure,
                    format!(
                        "dev: the daemon did not start within {}",
                        humantime::format_duration(limit)
                    ),
                ));
            }
        }
    }
}

/// Collects the changes that follow `first` until nothing changes for [`QUIET`]; the paths changed.
fn settle(
    inbox: &mpsc::Receiver<Event>,
    first: PathBuf,
    started: &mut Started,
) -> Result<BTreeSet<PathBuf>> {
    let mut changed = BTreeSet::from([first]);
    loop {
        match inbox.recv_timeout(QUIET) {
            Ok(Event::Changed(p)) => {
                changed.insert(p);
            }
            Ok(Event::Stop(_)) | Ok(Event::DaemonGone) => {
                started.stop();
                return Err(Failure::new(Exit::Failure, "dev: stopped while building"));
            }
            Ok(Event::Ready(_)) => {}
            Err(_) => return Ok(changed),
        }
    }
}

fn shown(dir: &Path, changed: &BTreeSet<PathBuf>) -> String {
    // Editors' and sed's temporary files are gone by now: name what is there (or all, if nothing is).
    let there: Vec<&PathBuf> = changed.iter().filter(|p| p.exists()).collect();
    let names: Vec<String> = (if there.is_empty() {
        changed.iter().collect()
    } else {
        there
    })
    .into_iter()
    .map(|p| p.strip_prefix(dir).unwrap_or(p).display().to_string())
    .collect();
    names.join(", ")
}

/// Runs the project's cases.jsonl, as `handler test` does (printing each); what failed, if anything.
fn run_cases(dir: &Path) -> std::result::Result<(), String> {
    if !dir.join("cases.jsonl").is_file() {
        return Ok(());
    }
    let args = HandlerArgs {
        path: Some(dir.to_path_buf()),
        handler: None,
        roles: Vec::new(),
        set: Vec::new(),
        memory: None,
        timeout: None,
    };
    super::handler::test(None, &args, None).map_err(|f| f.message)
}

/// A redis-server on a unix socket in `work`, keeping nothing on disk.
fn private_redis(work: &Path) -> Result<(Child, String)> {
    let socket = work.join("redis.sock");
    let child = command(Path::new("redis-server"))
        .args(["--port", "0", "--unixsocket"])
        .arg(&socket)
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(work)
        .arg("--logfile")
        .arg(work.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            Failure::new(
                Exit::Failure,
                format!(
                    "cannot start redis-server ({e}): install it (Debian: apt-get install redis-server), or give --redis URL"
                ),
            )
        })?;
    let url = format!("unix://{}", socket.display());
    let until = Instant::now() + Duration::from_secs(10);
    let mut child = Some(child);
    while Instant::now() < until {
        if socket.exists()
            && redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .is_ok()
        {
            return Ok((child.take().expect("still ours"), url));
        }
        if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
            return Err(Failure::new(
                Exit::Failure,
                format!(
                    "redis-server exited at start ({status}); see {}",
                    work.join("redis.log").display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(c) = child {
        stop_child(c, libc::SIGKILL, Duration::from_secs(1), "redis-server");
    }
    Err(Failure::new(
        Exit::Failure,
        format!("redis-server did not answer on {url} within 10 s"),
    ))
}

/// A TOML string (JSON's escapes are TOML's).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// Writes the dev config beside the deployed drop-in, and reads them back as the daemon will (so a
/// broken handler.toml is reported here, with its key path).
fn write_config(project: &Project, work: &Path, url: &str, api_key: &str) -> Result<Settings> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| {
        Failure::new(
            Exit::Failure,
            format!("the OS random generator failed: {e}"),
        )
    })?;
    let config = work.join("redstream.toml");
    let base = |author_roles: &[String]| {
        let roles: Vec<String> = author_roles.iter().map(|r| toml_str(r)).collect();
        format!(
            "# Written by `redstream handler dev` for this run only; the project's handler.toml is\n\
             # redstream.d/50-{name}.toml. Remade at every start.\n\
             [identity]\nname = {ident}\nroles = [\"admin\"]\n\n\
             [redis]\nurl = {url}\n\n\
             [auth]\nsigning_key = \"dev\"\n\n\
             [[auth.keys]]\nid = \"dev\"\nalgorithm = \"HS256\"\nsecret = \"{secret}\"\n\n\
             [[auth.api_keys]]\nname = \"author\"\nhash = \"{hash}\"\nidentity = \"author@dev\"\nroles = [{roles}]\n\n\
             [wasm]\nhandlers_dir = {handlers}\nwatch = true\n\n\
             [log]\nlevel = \"info\"\n\n\
             [daemon]\ndrain_timeout = \"5s\"\n",
            name = project.name,
            ident = toml_str(&format!("dev-{}", project.name)),
            url = toml_str(url),
            secret = hex::encode(secret),
            hash = crate::auth::apikey::hash(api_key),
            roles = roles.join(", "),
            handlers = toml_str(&work.join("handlers").display().to_string()),
        )
    };
    // The author's roles follow the streams the entry names: read and write on their domains, and
    // system_read for `redstream status`.
    write_private(&config, &base(&["system_read".into()]))?;
    let settings = crate::config::load(Some(&config))?;
    let mut domains = BTreeSet::new();
    for c in &settings.consumers {
        for stream in [&*c.stream, c.dead_letter.as_str()] {
            if let Ok(name) = settings.naming.parse(stream) {
                domains.insert(name.domain().to_owned());
            }
        }
    }
    for h in &settings.handlers {
        for role in h.roles.iter() {
            match role {
                crate::auth::Role::Read(d) | crate::auth::Role::Write(d) => {
                    domains.insert(d.clone());
                }
                crate::auth::Role::Admin => {}
            }
        }
    }
    let mut roles: Vec<String> = domains
        .iter()
        .flat_map(|d| [format!("{d}_read"), format!("{d}_write")])
        .collect();
    if !domains.contains("system") {
        roles.push("system_read".into());
    }
    write_private(&config, &base(&roles))?;
    Ok(crate::config::load(Some(&config))?)
}

fn write_private(path: &Path, text: &str) -> Result {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path.display()))?;
    f.write_all(text.as_bytes()).map_err(io(path.display()))
}

/// Copies the built component into the handlers directory (by rename, so the daemon never compiles a
/// half-written file) and the project's handler.toml to its drop-in when it changed — with its config
/// URLs on a stubbed origin pointed at the stub listeners (see [`redirect`]). What was pointed where.
fn deploy(
    dir: &Path,
    project: &Project,
    work: &Path,
    stubs: &BTreeMap<String, u16>,
) -> Result<Vec<String>> {
    let dropin = work
        .join("redstream.d")
        .join(format!("50-{}.toml", project.name));
    let entry = std::fs::read(dir.join("handler.toml")).map_err(io("handler.toml"))?;
    let (text, redirected) = redirect(&String::from_utf8_lossy(&entry), stubs);
    let text = text.map_or(entry.clone(), String::into_bytes);
    if std::fs::read(&dropin).ok().as_deref() != Some(&text[..]) {
        let tmp = work.join("redstream.d").join(".entry.tmp");
        std::fs::write(&tmp, &text).map_err(io(tmp.display()))?;
        std::fs::rename(&tmp, &dropin).map_err(io(dropin.display()))?;
    }
    let built = dir.join(&project.component);
    for file in component_files(&entry) {
        let to = work.join("handlers").join(&file);
        let tmp = work.join("handlers").join(format!(".{file}.tmp"));
        std::fs::copy(&built, &tmp).map_err(io(tmp.display()))?;
        std::fs::rename(&tmp, &to).map_err(io(to.display()))?;
    }
    Ok(redirected)
}

/// A handler.toml with each `[[handlers]]` entry's config URLs on a stubbed origin — one the entry's
/// `allowed_outbound_hosts` grants, so that production would send it — pointed at the origin's stub
/// listener, which the entry is granted too; and what was pointed where. None when nothing was (the
/// text deploys as written), or the text is not TOML (the daemon reports it, with its line).
fn redirect(entry: &str, stubs: &BTreeMap<String, u16>) -> (Option<String>, Vec<String>) {
    use crate::handlers::wasm::outbound::Origin;
    let mut redirected = Vec::new();
    let Ok(mut table) = entry.parse::<toml::Table>() else {
        return (None, redirected);
    };
    let Some(toml::Value::Array(handlers)) = table.get_mut("handlers") else {
        return (None, redirected);
    };
    for (i, handler) in handlers.iter_mut().enumerate() {
        let Some(handler) = handler.as_table_mut() else {
            continue;
        };
        let granted: Vec<Origin> = handler
            .get("allowed_outbound_hosts")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|o| Origin::parse(o.as_str()?).ok())
            .collect();
        let mut grant = Vec::new();
        if let Some(toml::Value::Table(config)) = handler.get_mut("config") {
            for (key, value) in config.iter_mut() {
                let Some(url) = value.as_str() else { continue };
                let Some((stubbed, port)) =
                    super::stub::origin_of(url).and_then(|o| Some((o, stubs.get(o)?)))
                else {
                    continue;
                };
                if !granted.iter().any(|o| o.grants(url)) {
                    continue;
                }
                let origin = format!("http://127.0.0.1:{port}");
                let to = format!("{origin}{}", &url[stubbed.len()..]);
                redirected.push(format!("handlers[{i}].config.{key} {url} -> {to}"));
                *value = toml::Value::String(to);
                if !grant.contains(&origin) {
                    grant.push(origin);
                }
            }
        }
        if let Some(toml::Value::Array(allowed)) = handler.get_mut("allowed_outbound_hosts") {
            allowed.extend(grant.into_iter().map(toml::Value::String));
        }
    }
    if redirected.is_empty() {
        return (None, redirected);
    }
    let text = toml::to_string(&table).ok().map(|t| {
        format!(
            "# The project's handler.toml as `redstream handler dev` deploys it: config URLs on an origin\n\
             # that cases.jsonl stubs point at the stub listeners.\n{t}"
        )
    });
    (text, redirected)
}

/// The `file` of each `[[handlers]]` entry of a handler.toml that is a bare file name (one the dev
/// handlers directory holds).
fn component_files(entry: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        handlers: Vec<File>,
    }
    #[derive(serde::Deserialize)]
    struct File {
        file: String,
    }
    use figment::providers::Format as _;
    let text = String::from_utf8_lossy(entry);
    let parsed: Option<Entry> = figment::Figment::from(figment::providers::Toml::string(&text))
        .extract()
        .ok();
    parsed
        .map(|e| e.handlers.into_iter().map(|h| h.file))
        .into_iter()
        .flatten()
        .filter(|f| !f.contains('/'))
        .collect()
}

/// `redstream token issue` with the author's API key: the token the author acts with.
fn issue_token(exe: &Path, config: &Path, api_key: &str) -> Result<String> {
    let out = command(exe)
        .arg("--config")
        .arg(config)
        .args(["token", "issue", "--ttl", "12h"])
        .env("REDSTREAM_API_KEY", api_key)
        .stdin(Stdio::null())
        .output()
        .map_err(io("cannot run token issue"))?;
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || token.is_empty() {
        return Err(Failure::new(
            Exit::Failure,
            format!(
                "dev: issuing the author's token failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(token)
}

/// The stream and message of the project's first case: the case's stream if it names one of the
/// handler's consumed streams, else the first stream consumed for the handler.
fn first_case(
    dir: &Path,
    settings: &Settings,
    handler: &str,
) -> Option<(String, serde_json::Map<String, Value>)> {
    let text = std::fs::read_to_string(dir.join("cases.jsonl")).ok()?;
    let case: Value = serde_json::from_str(text.lines().find(|l| !l.trim().is_empty())?).ok()?;
    let message = case.get("message")?.as_object()?.clone();
    // The dev config's consumers are the entry's: those of this handler's group first.
    let mut consumers: Vec<_> = settings.consumers.iter().collect();
    consumers.sort_by_key(|c| c.group != handler);
    let consumed: Vec<&str> = consumers.iter().map(|c| &*c.stream).collect();
    let stream = match case.get("stream").and_then(Value::as_str) {
        Some(s) if consumed.contains(&s) => s.to_owned(),
        _ => consumed.first()?.to_string(),
    };
    Some((stream, message))
}

/// `redstream publish STREAM --json -` as the author.
fn publish(
    exe: &Path,
    config: &Path,
    token: &str,
    stream: &str,
    message: &serde_json::Map<String, Value>,
) {
    let child = command(exe)
        .arg("--config")
        .arg(config)
        .args(["publish", stream, "--json", "-"])
        .env("REDSTREAM_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let result = child.and_then(|mut c| {
        if let Some(mut stdin) = c.stdin.take() {
            stdin.write_all(Value::Object(message.clone()).to_string().as_bytes())?;
        }
        c.wait_with_output()
    });
    match result {
        Ok(out) if out.status.success() => println!(
            "dev: sent the first case to {stream} ({})",
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        Ok(out) => println!(
            "dev: sending the first case failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => println!("dev: cannot run publish: {e}"),
    }
}

fn shell_word(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn banner(
    project: &Project,
    url: &str,
    redis: Option<&Child>,
    daemon_pid: u32,
    env_file: &Path,
    first: Option<&(String, serde_json::Map<String, Value>)>,
    redirected: &[String],
) {
    let redis = match redis {
        Some(c) => format!("{url} (private redis-server, pid {})", c.id()),
        None => url.to_owned(),
    };
    println!("\ndev: {} ({}) is running", project.name, project.lang);
    println!("  redis    {redis}");
    println!(
        "  daemon   pid {daemon_pid}, config {}",
        env_file.with_file_name("redstream.toml").display()
    );
    println!(
        "  token    in {} (for redstream publish, read, status)",
        env_file.display()
    );
    if let Some((stream, message)) = first {
        println!(
            "  try      . {} && echo {} | redstream publish {stream} --json -",
            shell_word(&env_file.display().to_string()),
            shell_word(&Value::Object(message.clone()).to_string())
        );
    }
    print_redirected(redirected);
    println!("  watching the project: a change rebuilds, tests and redeploys; Ctrl-C stops\n");
}

/// Where the handler's requests to stubbed origins go now (cases.jsonl's `"http"` answers them).
fn print_redirected(redirected: &[String]) {
    for (i, line) in redirected.iter().enumerate() {
        let head = if i == 0 { "  stubs   " } else { "          " };
        println!("{head} {line} (answered from cases.jsonl \"http\")");
    }
}

/// The stream patterns to print entries of: those of the domains the handler's entry touches, but
/// not the daemon's own (system) streams.
fn follow(settings: &Settings) -> Vec<String> {
    let mut domains = BTreeSet::new();
    for c in &settings.consumers {
        if let Ok(n) = settings.naming.parse(&c.stream) {
            domains.insert(n.domain().to_owned());
        }
    }
    for h in &settings.handlers {
        for role in h.roles.iter() {
            match role {
                crate::auth::Role::Write(d) => {
                    domains.insert(d.clone());
                }
                crate::auth::Role::Admin => {
                    domains.extend(settings.naming.domains().iter().cloned());
                }
                crate::auth::Role::Read(_) => {}
            }
        }
    }
    domains.remove("system");
    domains.into_iter().map(|d| format!("nova:{d}:*")).collect()
}

fn spawn_signals(mut signals: signal_hook::iterator::Signals, events: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if events.send(Event::Stop(signal)).is_err() {
                return;
            }
        }
    });
}

/// Prints the daemon's log as it comes and tells the loop when it runs, reloads, or is gone.
fn spawn_daemon_log(log: std::process::ChildStderr, events: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        for line in BufReader::new(log).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if line.contains("redstream running") {
                let _ = events.send(Event::Ready(true));
            } else if line.contains("reloaded the config") {
                let _ = events.send(Event::Ready(false));
            }
        }
        let _ = events.send(Event::DaemonGone);
    });
}

/// Prints every entry added to a stream matching `patterns` from now on: `STREAM ID {fields}`.
fn spawn_tail(url: String, patterns: Vec<String>) {
    std::thread::spawn(move || {
        let mut conn = None;
        let mut last: BTreeMap<String, String> = BTreeMap::new();
        let mut scanned = Instant::now() - Duration::from_secs(60);
        let mut first_scan = true;
        loop {
            let c = match &mut conn {
                Some(c) => c,
                None => match redis::Client::open(url.as_str()).and_then(|c| c.get_connection()) {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            if scanned.elapsed() >= Duration::from_secs(1) {
                scanned = Instant::now();
                for pattern in &patterns {
                    let found: Vec<String> = match redis::cmd("SCAN")
                        .arg(0)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(10_000)
                        .arg("TYPE")
                        .arg("stream")
                        .query::<(String, Vec<String>)>(c)
                    {
                        Ok((_, keys)) => keys,
                        Err(_) => continue,
                    };
                    for key in found {
                        // Streams there before the loop began are printed from now on; later ones whole.
                        let from = if first_scan { "$" } else { "0-0" };
                        last.entry(key).or_insert_with(|| from.to_owned());
                    }
                }
                first_scan = false;
                // "$" means "from when the read runs": pin it to the stream's last id once seen.
                for (key, id) in last.iter_mut().filter(|(_, id)| id.as_str() == "$") {
                    let newest: redis::RedisResult<redis::streams::StreamRangeReply> =
                        redis::cmd("XREVRANGE")
                            .arg(key)
                            .arg("+")
                            .arg("-")
                            .arg("COUNT")
                            .arg(1)
                            .query(c);
                    *id = newest
                        .ok()
                        .and_then(|r| r.ids.into_iter().next())
                        .map_or("0-0".into(), |e| e.id);
                }
            }
            if last.is_empty() {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(100)
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS");
            for key in last.keys() {
                cmd.arg(key);
            }
            for id in last.values() {
                cmd.arg(id);
            }
            let reply: redis::RedisResult<Option<redis::streams::StreamReadReply>> = cmd.query(c);
            match reply {
                Ok(Some(reply)) => {
                    let mut out = std::io::stdout().lock();
                    for key in reply.keys {
                        for entry in &key.ids {
                            let fields: serde_json::Map<String, Value> = entry
                                .map
                                .iter()
                                .map(|(k, v)| (k.clone(), Value::String(text_of(v))))
                                .collect();
                            let _ =
                                writeln!(out, "{} {} {}", key.key, entry.id, Value::Object(fields));
                        }
                        if let Some(newest) = key.ids.last() {
                            last.insert(key.key.clone(), newest.id.clone());
                        }
                    }
                    let _ = out.flush();
                }
                Ok(None) => {}
                Err(_) => {
                    conn = None;
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    });
}

fn text_of(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// Watches the project recursively; changes of source files (not of [`NOT_SOURCES`], nor editor swap
/// files) go to the loop.
fn watch(dir: &Path, events: mpsc::Sender<Event>) -> Result<notify::RecommendedWatcher> {
    let root = dir.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        for path in event.paths {
            if is_source(&root, &path) {
                let _ = events.send(Event::Changed(path));
            }
        }
    })
    .map_err(|e| {
        Failure::new(
            Exit::Failure,
            format!("cannot watch {}: {e}", dir.display()),
        )
    })?;
    watcher.watch(dir, RecursiveMode::Recursive).map_err(|e| {
        Failure::new(
            Exit::Failure,
            format!("cannot watch {}: {e}", dir.display()),
        )
    })?;
    Ok(watcher)
}

fn is_source(root: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(root) else {
        return false;
    };
    let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy());
    if parts.any(|p| NOT_SOURCES.contains(&p.as_ref())) {
        return false;
    }
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    !(name.is_empty()
        || name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.starts_with(".#")
        || name == "4913")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_what_the_author_edits() {
        let root = Path::new("/p");
        for yes in [
            "/p/src/lib.rs",
            "/p/app.py",
            "/p/cases.jsonl",
            "/p/handler.toml",
            "/p/src/handler.js",
        ] {
            assert!(is_source(root, Path::new(yes)), "{yes}");
        }
        for no in [
            "/p/target/release/x.wasm",
            "/p/dist/x.wasm",
            "/p/node_modules/a/b.js",
            "/p/.venv/lib/x.py",
            "/p/__pycache__/app.cpython-311.pyc",
            "/p/.redstream-dev/redstream.toml",
            "/p/src/.lib.rs.swp",
            "/p/src/lib.rs~",
            "/p/4913",
            "/p",
            "/elsewhere/lib.rs",
        ] {
            assert!(!is_source(root, Path::new(no)), "{no}");
        }
    }

    #[test]
    fn component_files_are_the_bare_file_names_of_the_entry() {
        let toml = b"[[handlers]]\nname = \"a\"\nfile = \"a.wasm\"\n[[handlers]]\nname = \"b\"\nfile = \"/opt/b.wasm\"\n";
        assert_eq!(component_files(toml), ["a.wasm"]);
        assert!(component_files(b"not toml [").is_empty());
    }

    #[test]
    fn shell_words_quote_what_the_shell_would_split() {
        assert_eq!(shell_word("/a/b.toml"), "/a/b.toml");
        assert_eq!(shell_word("{\"greet\":\"you\"}"), "'{\"greet\":\"you\"}'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}
