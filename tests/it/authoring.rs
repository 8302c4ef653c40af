//! Handler authoring: config drop-ins and a handlers directory, routes scoped to a consumer, `check`
//! warnings for configs that run but do not do what their author meant, `wasm.watch`, and the
//! `redstream handler new / build / test / run --config --handler` commands.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use redstream::config;

use crate::util::{
    Daemon, RedisServer, bin, config_toml, daemon_toml, redstream, root, settings_from,
};

fn echo_wasm() -> std::path::PathBuf {
    root().join("handlers/build/echo.wasm")
}

/// A config file (the test identity and key, then `extra`) in a directory of its own.
fn config_file(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redstream.toml");
    write(&path, &config_toml("redis://127.0.0.1:1", extra));
    (dir, path)
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// `redstream.d/*.toml` beside the config: read in lexical order, arrays of tables appended, scalars
/// overridden, each problem naming the drop-in it came from; relative handler files are found in
/// `wasm.handlers_dir`.
#[test]
fn drop_ins_merge_in_lexical_order_and_report_their_file() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("redstream.toml");
    let handlers = dir.path().join("lib/handlers");
    std::fs::create_dir_all(&handlers).unwrap();
    std::fs::copy(echo_wasm(), handlers.join("greeter.wasm")).unwrap();
    write(
        &main,
        &daemon_toml(
            "redis://127.0.0.1:1",
            r#"
[naming]
domains = ["task", "system"]

[wasm]
handlers_dir = "lib/handlers"

[[consumers]]
stream = "nova:task:main:in"
group = "main"
handler = "drop"
max_deliveries = 3
"#,
        ),
    );
    let d = dir.path().join("redstream.d");
    // Read after 10-*: its scalar wins; both add a consumer.
    write(
        &d.join("20-greeter.toml"),
        r#"
[daemon]
drain_timeout = "7s"

[[handlers]]
name = "greeter"
file = "greeter.wasm"
roles = ["task_write"]

[[consumers]]
stream = "nova:task:greeter:requests"
group = "greeter"
handler = "greeter"
"#,
    );
    write(
        &d.join("10-base.toml"),
        r#"
[naming]
domains = ["billing"]

[daemon]
drain_timeout = "3s"

[[consumers]]
stream = "nova:task:base:in"
group = "base"
handler = "drop"
"#,
    );
    // Not drop-ins: a backup and a hidden editor file.
    write(&d.join("30-old.toml~"), "this is not toml = = =");
    write(&d.join(".40-swap.toml"), "this is not toml = = =");

    let s = config::load(Some(&main)).expect("valid with its drop-ins");
    assert_eq!(
        s.dropins,
        vec![d.join("10-base.toml"), d.join("20-greeter.toml")]
    );
    let streams: Vec<&str> = s.consumers.iter().map(|c| &*c.stream).collect();
    assert_eq!(
        streams,
        [
            "nova:task:main:in",
            "nova:task:base:in",
            "nova:task:greeter:requests"
        ]
    );
    assert_eq!(s.daemon.drain_timeout, Duration::from_secs(7));
    // Plain arrays are appended too: a drop-in adds a domain to those the file gave.
    assert_eq!(s.naming.domains(), ["task", "system", "billing"]);
    assert_eq!(s.handlers[0].file, handlers.join("greeter.wasm"));

    // A problem in a drop-in names the drop-in and the merged key path.
    write(
        &d.join("25-broken.toml"),
        "[[consumers]]\nstream = \"nova:task:broken:in\"\ngroup = \"b\"\nhandler = \"drop\"\nmax_deliveries = \"many\"\n",
    );
    let err = config::load(Some(&main)).expect_err("the broken drop-in is refused");
    let p = err
        .problems
        .iter()
        .find(|p| p.path == "consumers[3].max_deliveries")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        p.origin.as_deref() == Some(d.join("25-broken.toml").to_str().unwrap()),
        "{p}"
    );
    std::fs::remove_file(d.join("25-broken.toml")).unwrap();

    // A missing handler file says how to build one.
    std::fs::remove_file(handlers.join("greeter.wasm")).unwrap();
    let err = config::load(Some(&main)).expect_err("missing component");
    let p = err
        .problems
        .iter()
        .find(|p| p.path == "handlers[0].file")
        .unwrap();
    assert!(p.message.contains("redstream handler build"), "{p}");
}

/// `[[consumers.routes]]` give one consumer its own table: two groups on one stream run different
/// handlers, where shared top-level routes would run the same one in both.
#[test]
fn consumer_routes_are_scoped_and_checked() {
    let s = settings_from(&daemon_toml(
        "redis://127.0.0.1:1",
        r#"
[[routes]]
stream = "nova:task:orders:events"
drop = true

[[consumers]]
stream = "nova:task:orders:events"
group = "audit"
[[consumers.routes]]
equals = { type = "order_paid" }
forward = "nova:task:audit:paid"
[[consumers.routes]]
drop = true

[[consumers]]
stream = "nova:task:orders:events"
group = "legacy"
"#,
    ))
    .expect("valid");
    let audit = &s.consumers[0];
    assert_eq!(audit.routes.len(), 2);
    assert_eq!(
        audit.routes[0].action.to_string(),
        "forward to nova:task:audit:paid"
    );
    assert_eq!(s.consumers[1].routes.len(), 1, "the top-level route");
    assert_eq!(s.consumers[1].routes[0].action.to_string(), "drop");

    let err = settings_from(&daemon_toml(
        "redis://127.0.0.1:1",
        r#"
[[consumers]]
stream = "nova:task:orders:events"
group = "both"
handler = "drop"
[[consumers.routes]]
stream = "nova:task:other:events"
drop = true
"#,
    ))
    .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("consumers[0].routes: give handler = NAME or [[consumers.routes]], not both"),
        "{text}"
    );
    assert!(
        text.contains("consumers[0].routes[0].stream: nova:task:other:events never matches this consumer's stream"),
        "{text}"
    );
}

/// The warnings of a daemon config with `extra` (consumers, handlers, routes).
fn warnings(extra: &str) -> Vec<String> {
    settings_from(&daemon_toml("redis://127.0.0.1:1", extra))
        .expect("valid: warnings never refuse a config")
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// What the friction report found: an appended route shadowed by an earlier one, a second group
/// running another consumer's handler, and a handler configured to publish where it may not. Each is
/// a warning naming the key; a config without them has none.
#[test]
fn check_warns_about_shadowed_routes_doubled_handlers_and_config_streams() {
    let echo = echo_wasm();
    let handlers = format!(
        r#"
[[handlers]]
name = "indexer"
file = "{echo}"
roles = ["task_write"]

[[handlers]]
name = "escalator"
file = "{echo}"
roles = ["task_write"]
config = {{ reply_to = "nova:devops:alerts:escalations", limit = "5", same = "nova:task:x:out" }}
"#,
        echo = echo.display()
    );
    let w = warnings(&format!(
        r#"{handlers}
[[routes]]
stream = "nova:task:*:tasks"
handler = "indexer"

[[routes]]
stream = "nova:task:boomerang:tasks"
exists = ["priority"]
handler = "escalator"

[[consumers]]
stream = "nova:task:boomerang:tasks"
group = "index"

[[consumers]]
stream = "nova:task:boomerang:tasks"
group = "escalate"
"#
    ));
    let joined = w.join("\n");
    assert_eq!(w.len(), 3, "{joined}");
    assert!(
        w[0].starts_with(
            "routes[1]: can never match: routes[0] (nova:task:*:tasks, handler indexer) comes first"
        ),
        "{joined}"
    );
    assert!(
        w[1].starts_with("consumers[1]: every message of nova:task:boomerang:tasks goes to indexer, which consumers[0] (group index) runs"),
        "{joined}"
    );
    assert!(
        w[2].starts_with("handlers[1].config.reply_to: names stream nova:devops:alerts:escalations, which this handler's roles (task_write) do not let it publish"),
        "{joined}"
    );

    // The fix the warnings point at: the narrower route first and each group its own table.
    let w = warnings(
        &format!(
            r#"{handlers}
[[consumers]]
stream = "nova:task:boomerang:tasks"
group = "index"
handler = "indexer"

[[consumers]]
stream = "nova:task:boomerang:tasks"
group = "escalate"
[[consumers.routes]]
exists = ["priority"]
handler = "escalator"
[[consumers.routes]]
drop = true
"#
        )
        .replace(
            "nova:devops:alerts:escalations",
            "nova:task:alerts:escalations",
        ),
    );
    assert!(w.is_empty(), "{w:#?}");

    // Patterns: a wildcard route before an exact one shadows it everywhere; an exact route before a
    // wildcard one shadows the wildcard for the consumer of that stream only.
    let w = warnings(&format!(
        r#"{handlers}
[[routes]]
stream = "nova:task:*:jobs"
handler = "indexer"
[[routes]]
stream = "nova:task:a:jobs"
equals = {{ type = "x" }}
handler = "escalator"
[[routes]]
stream = "nova:task:a:tasks"
handler = "indexer"
[[routes]]
stream = "nova:task:*:tasks"
handler = "escalator"
[[consumers]]
stream = "nova:task:a:tasks"
group = "a"
[[consumers]]
stream = "nova:task:b:tasks"
group = "b"
[[consumers]]
stream = "nova:task:a:jobs"
group = "j"
"#
    ));
    let joined = w.join("\n");
    assert!(
        joined.contains("routes[1]: can never match: routes[0] (nova:task:*:jobs"),
        "{joined}"
    );
    assert!(
        joined.contains(
            "routes[3]: can never match for consumers[0] (stream nova:task:a:tasks): routes[2]"
        ),
        "{joined}"
    );
    assert!(
        !joined.contains("consumers[1] (stream nova:task:b:tasks)"),
        "{joined}"
    );
}

/// `check` prints the warnings (and still exits 0); `run` logs them (the watch test checks that).
#[test]
fn check_prints_warnings_and_exits_zero() {
    let (_dir, path) = config_file(
        r#"
[[routes]]
stream = "nova:task:a:tasks"
drop = true
[[routes]]
stream = "nova:task:a:tasks"
forward = "nova:task:a:copies"
"#,
    );
    let (code, stdout, _) = redstream(&["--config", path.to_str().unwrap(), "check"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout
            .contains("  warning: routes[1]: can never match: routes[0] (nova:task:a:tasks, drop)"),
        "{stdout}"
    );
    // Indexes are of the merged config: a warning about a table a drop-in wrote names that file.
    let dropins = config::dropin_dir(&path);
    std::fs::create_dir(&dropins).unwrap();
    let late = dropins.join("50-late.toml");
    write(
        &late,
        "[[routes]]\nstream = \"nova:task:a:tasks\"\nforward = \"nova:task:a:later\"\n",
    );
    let (code, stdout, _) = redstream(&["--config", path.to_str().unwrap(), "check"]);
    assert_eq!(code, Some(0), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("warning: routes[2]"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.ends_with(&format!("(from {})", late.display())),
        "{line}"
    );
}

/// An inline secret in a config file other users can read is a warning naming the key and the mode,
/// and what to use instead; the same file private to its owner is not.
#[test]
fn check_warns_about_inline_secrets_in_a_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_dir, path) = config_file("");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stdout, _) = redstream(&["--config", path.to_str().unwrap(), "check"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("warning: auth.keys[0].secret: a secret written inline")
            && stdout.contains("mode 0644")
            && stdout.contains("{ file = \"/path\" }"),
        "{stdout}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stdout, _) = redstream(&["--config", path.to_str().unwrap(), "check"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(!stdout.contains("written inline"), "{stdout}");
}

/// `wasm.watch = true`: a rebuilt component copied over the old one is picked up without SIGHUP, and
/// the reload says which handler changed; replies come from the new build.
#[test]
fn watch_reloads_a_changed_handler_and_names_it() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("h.wasm");
    std::fs::copy(echo_wasm(), &wasm).unwrap();
    let toml = daemon_toml(
        &server.url(),
        &format!(
            r#"
[wasm]
watch = true

[[handlers]]
name = "h"
file = "{}"
roles = ["task_write"]
config = {{ reply_to = "nova:task:watch:out", audit = "nova:devops:audit:log" }}

[[consumers]]
stream = "nova:task:watch:in"
group = "g"
handler = "h"
"#,
            wasm.display()
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    assert!(d.wait_log("wasm.watch: reloading when", Duration::from_secs(10)));
    // `run` logs the config's warnings as `check` prints them.
    assert!(d.wait_log(
        "config: names stream nova:devops:audit:log",
        Duration::from_secs(10)
    ));
    let replies = |n: usize| {
        crate::util::wait_for("replies", Duration::from_secs(20), || {
            let got = server.entries("nova:task:watch:out");
            (got.len() >= n).then_some(got)
        })
    };
    server.xadd("nova:task:watch:in", &[("greet", "one")]);
    let first = replies(1);
    assert_eq!(
        first[0].fields.get_str("greet"),
        Some("one"),
        "echo answers"
    );

    // The template answers with `greeting`, the echo with the fields it got: the new file is running.
    // Replaced by rename, as build tools and package managers do.
    let tmp = dir.path().join("h.wasm.new");
    std::fs::copy(root().join("handlers/build/template.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, &wasm).unwrap();
    assert!(
        d.wait_log("handlers_changed=[\"h\"]", Duration::from_secs(20)),
        "{:#?}",
        d.logs()
    );
    server.xadd("nova:task:watch:in", &[("greet", "two")]);
    let after = replies(2);
    assert_eq!(after[1].fields.get_str("greeting"), Some("hello, two"));

    // A drop-in directory made after start is seen (its creation reloads and watches it), and a
    // drop-in written there adds its consumer.
    let reloads = d.count_log("reloaded the config");
    let dropins = redstream::config::dropin_dir(&d.config_path());
    std::fs::create_dir(&dropins).unwrap();
    crate::util::wait_for(
        "the reload for the new directory",
        Duration::from_secs(20),
        || (d.count_log("reloaded the config") > reloads).then_some(()),
    );
    write(
        &dropins.join("50-more.toml"),
        "[[consumers]]\nstream = \"nova:task:watch:more\"\ngroup = \"more\"\nhandler = \"drop\"\n",
    );
    assert!(
        d.wait_log("started=1", Duration::from_secs(20)),
        "{:#?}",
        d.logs()
    );
    assert_eq!(d.stop(Duration::from_secs(20)), 0);
}

/// `wasm.watch` never misses a handler whose files arrive one by one: a drop-in naming a component
/// that is not there yet is refused, and the component's arrival applies it; a component copied in
/// first is loaded once its drop-in arrives.
#[test]
fn watch_loads_a_handler_whichever_of_its_files_arrives_first() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let handlers = dir.path().join("handlers");
    std::fs::create_dir(&handlers).unwrap();
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[wasm]\nwatch = true\nhandlers_dir = \"{}\"\n\n\
             [[consumers]]\nstream = \"nova:task:arrive:base\"\ngroup = \"g\"\nhandler = \"drop\"\n",
            handlers.display()
        ),
    );
    let mut d = Daemon::start(&toml, &[]);
    let dropins = redstream::config::dropin_dir(&d.config_path());
    std::fs::create_dir(&dropins).unwrap();
    assert!(d.wait_log("redstream running", Duration::from_secs(20)));
    // What one drop-in deploys: handler `name` from `name.wasm`, answering on its own stream.
    let dropin = |name: &str| {
        format!(
            "[[handlers]]\nname = \"{name}\"\nfile = \"{name}.wasm\"\nroles = [\"task_write\"]\n\
             config = {{ reply_to = \"nova:task:arrive:{name}-out\" }}\n\
             [[consumers]]\nstream = \"nova:task:arrive:{name}\"\ngroup = \"g\"\nstart = \"0\"\nhandler = \"{name}\"\n"
        )
    };
    // A component arrives by rename, as build tools and package managers write them.
    let arrive = |name: &str| {
        let tmp = handlers.join(format!("{name}.wasm.tmp"));
        std::fs::copy(echo_wasm(), &tmp).unwrap();
        std::fs::rename(&tmp, handlers.join(format!("{name}.wasm"))).unwrap();
    };
    let answers = |name: &str| {
        server.xadd(&format!("nova:task:arrive:{name}"), &[("n", name)]);
        crate::util::wait_for(&format!("{name}'s echo"), Duration::from_secs(20), || {
            (server.xlen(&format!("nova:task:arrive:{name}-out")) == 1).then_some(())
        });
    };

    // The drop-in first: refused (its component is missing), then applied when the component comes.
    let refused = d.count_log("reload refused");
    write(&dropins.join("10-first.toml"), &dropin("first"));
    crate::util::wait_for("the refused reload", Duration::from_secs(20), || {
        (d.count_log("reload refused") > refused).then_some(())
    });
    arrive("first");
    answers("first");

    // The component first: nothing to do until its drop-in names it.
    arrive("second");
    write(&dropins.join("20-second.toml"), &dropin("second"));
    answers("second");
    assert_eq!(d.stop(Duration::from_secs(20)), 0);
}

/// From nothing to a tested handler in each language, with only `handler new`, `handler build` and
/// `handler test`, out of this repository's tree: the scaffold builds anywhere, its example test passes
/// with the roles and config of its handler.toml, and a build without the toolchain says what to
/// install.
#[test]
fn new_build_test_in_each_language() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().to_str().unwrap();
    for lang in ["rust", "js", "python"] {
        let name = format!("greeter-{lang}");
        let (code, out, err) = redstream(&["handler", "new", &name, "--lang", lang, "--dir", at]);
        assert_eq!(code, Some(0), "{out}{err}");
        let project = dir.path().join(&name);
        let p = project.to_str().unwrap();
        if lang == "rust" {
            let lock = std::fs::read_to_string(project.join("Cargo.lock")).unwrap();
            assert!(lock.contains(&format!("name = \"{name}\"")), "{lock}");
        }
        let (code, out, err) = redstream(&["handler", "build", p]);
        assert_eq!(code, Some(0), "{lang}: {out}{err}");
        assert!(
            out.starts_with(&format!("built {p}/dist/{name}.wasm (")),
            "{out}"
        );
        let (code, out, err) = redstream(&["handler", "test", p]);
        assert_eq!(code, Some(0), "{lang}: {out}{err}");
        assert!(out.contains("2 of 2 cases passed"), "{out}");
        if lang != "rust" {
            // (Rust's `handler dev` has a test of its own, below.)
            dev_answers_the_first_case(&project, &name);
        }
        // The project's handler.toml decides the roles: taking task_write away denies the reply.
        let entry = project.join("handler.toml");
        let text = std::fs::read_to_string(&entry).unwrap();
        std::fs::write(&entry, text.replace("task_write", "task_read")).unwrap();
        let (code, out, _) = redstream(&["handler", "run", p, "--message", r#"{"greet":"you"}"#]);
        assert_eq!(code, Some(1), "{out}");
        assert!(
            out.contains("reply refused: denied: handler greeter-"),
            "{lang}: {out}"
        );
        let (code, out, _) = redstream(&["handler", "test", p]);
        assert_eq!(code, Some(1));
        assert!(
            out.contains("FAILED  greets") && out.contains("1 of 2 cases passed"),
            "{out}"
        );
        // A syntax error is reported where it is, in a few lines, before the toolchain runs.
        let broken = match lang {
            "js" => Some(("src/handler.js", "export const = ;\n", "src/handler.js:")),
            "python" => Some(("app.py", "x = (\n", "File \"app.py\", line")),
            _ => None,
        };
        if let Some((file, bad, says)) = broken {
            let path = project.join(file);
            let good = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, format!("{good}\n{bad}")).unwrap();
            let (code, out, err) = redstream(&["handler", "build", p]);
            assert_eq!(code, Some(1), "{lang}: {out}{err}");
            assert!(
                err.contains(says) && err.contains("SyntaxError") && err.lines().count() <= 8,
                "{lang}: {err}"
            );
            std::fs::write(&path, good).unwrap();
        }
    }
    // No toolchain on PATH: the message names what to install.
    let empty = tempfile::tempdir().unwrap();
    for (lang, says) in [
        ("rust", "cargo is not installed: install Rust with rustup"),
        (
            "js",
            "npm is not installed: install Node.js 18 or newer with npm",
        ),
        (
            "python",
            "python3 is not installed: install Python 3.10 or newer",
        ),
    ] {
        let project = dir.path().join(format!("bare-{lang}"));
        let (code, ..) = redstream(&[
            "handler",
            "new",
            &format!("bare-{lang}"),
            "--lang",
            lang,
            "--dir",
            at,
        ]);
        assert_eq!(code, Some(0));
        let out = Command::new(bin())
            .args(["handler", "build", project.to_str().unwrap()])
            .env("PATH", empty.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{lang}: {err}");
    }
    let (code, _, err) = redstream(&["handler", "new", "Bad Name", "--lang", "rust", "--dir", at]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a handler name"), "{err}");
    let (code, _, err) = redstream(&[
        "handler",
        "new",
        "greeter-rust",
        "--lang",
        "rust",
        "--dir",
        at,
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("exists and is not empty"), "{err}");
}

/// The echo example in Rust, JavaScript and Python gives the same outcome, reason and replies for the
/// same messages: the shared cases pass for each, and their `handler run` output is identical.
#[test]
fn echo_parity_across_languages() {
    let dir = tempfile::tempdir().unwrap();
    let mut components = vec![echo_wasm()];
    for lang in ["js", "py"] {
        // Built from a copy, so parallel runs never share a node_modules or .venv in the tree.
        let src = root().join(format!("handlers/examples/echo-{lang}"));
        let copy = dir.path().join(format!("echo-{lang}"));
        copy_tree(&src, &copy);
        let (code, out, err) = redstream(&["handler", "build", copy.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{out}{err}");
        components.push(copy.join(format!("dist/echo-{lang}.wasm")));
        if lang == "js" {
            // The same source and SDK under the other engine (QuickJS above, StarlingMonkey here).
            let built = Command::new("npm")
                .args(["run", "--silent", "build:starlingmonkey"])
                .current_dir(&copy)
                .output()
                .unwrap();
            assert!(built.status.success(), "{built:?}");
            components.push(copy.join("dist/echo-js-starlingmonkey.wasm"));
        }
    }
    let cases = root().join("handlers/examples/echo/cases.jsonl");
    // Same file name, so the handler's name in denial reasons is the same too.
    let named: Vec<std::path::PathBuf> = components
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let to = dir.path().join(format!("lang{i}/echo.wasm"));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(c, &to).unwrap();
            to
        })
        .collect();
    for c in &named {
        let (code, out, err) = redstream(&[
            "handler",
            "test",
            c.to_str().unwrap(),
            "--cases",
            cases.to_str().unwrap(),
            "--role",
            "task_write",
        ]);
        assert_eq!(code, Some(0), "{}: {out}{err}", c.display());
        assert!(out.contains("10 of 10 cases passed"), "{out}");
    }
    for line in std::fs::read_to_string(&cases).unwrap().lines() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let message = case["message"].to_string();
        let outputs: Vec<serde_json::Value> = named
            .iter()
            .map(|c| {
                let (_, out, _) = redstream(&[
                    "handler",
                    "run",
                    c.to_str().unwrap(),
                    "--message",
                    &message,
                    "--role",
                    "task_write",
                ]);
                let mut v: serde_json::Value = serde_json::from_str(&out).unwrap();
                let v = v.as_object_mut().unwrap();
                v.remove("elapsed_us");
                v.remove("output");
                serde_json::Value::Object(v.clone())
            })
            .collect();
        for (i, lang) in ["js (QuickJS)", "js (StarlingMonkey)", "python"]
            .iter()
            .enumerate()
        {
            assert_eq!(outputs[0], outputs[i + 1], "rust vs {lang} for {message}");
        }
    }
}

/// A component built against redstream:handler@0.1.0 (the echo example as it was before 0.1.1 added
/// `retry-after`; kept as a fixture) links and runs unchanged on this daemon: later 0.1.x versions
/// only add to the contract. (The cases of what it did not know yet are left out.)
#[test]
fn a_handler_built_against_the_previous_contract_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let old = crate::util::fixture("handlers/echo-wit-0.1.0.wasm");
    let cases = std::fs::read_to_string(root().join("handlers/examples/echo/cases.jsonl")).unwrap();
    let before: Vec<&str> = cases
        .lines()
        .filter(|l| {
            !l.contains("retry_after_ms") && !l.contains("_delay_ms") && !l.contains("_count")
        })
        .collect();
    let file = dir.path().join("cases.jsonl");
    std::fs::write(&file, before.join("\n")).unwrap();
    let (code, out, err) = redstream(&[
        "handler",
        "test",
        old.to_str().unwrap(),
        "--cases",
        file.to_str().unwrap(),
        "--role",
        "task_write",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!("{0} of {0} cases passed", before.len())),
        "{out}"
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if [
            "node_modules",
            ".venv",
            "dist",
            "__pycache__",
            "package-lock.json",
        ]
        .contains(&name.to_str().unwrap())
        {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            copy_tree(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

/// The examples carry copies of the SDKs and the WIT (the guest toolchains do not follow links out of
/// a project): they must stay the same as their sources.
#[test]
fn sdk_copies_in_the_examples_match_their_sources() {
    let h = root().join("handlers");
    for (copy, source) in [
        ("examples/echo-js/src/redstream.js", "sdk-js/redstream.js"),
        ("examples/echo-py/redstream.py", "sdk-python/redstream.py"),
        ("examples/echo-js/wit/handler.wit", "wit/handler.wit"),
        ("examples/echo-py/wit/handler.wit", "wit/handler.wit"),
    ] {
        assert_eq!(
            std::fs::read_to_string(h.join(copy)).unwrap(),
            std::fs::read_to_string(h.join(source)).unwrap(),
            "handlers/{copy} differs from handlers/{source}: copy it again"
        );
    }
    // The Rust template's Cargo.lock pins what the SDK is tested with: every package it names at the
    // version handlers/Cargo.lock has. (To refresh it: `handler new` a project, `cargo
    // generate-lockfile` there, and put its name back as {{name}}.)
    let packages = |path: &str| -> Vec<(String, String)> {
        let text = std::fs::read_to_string(h.join(path)).unwrap();
        text.split("[[package]]")
            .filter_map(|p| {
                let field = |k: &str| {
                    p.lines()
                        .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
                        .map(|v| v.trim_end_matches('"').to_owned())
                };
                Some((field("name")?, field("version")?))
            })
            .collect()
    };
    let tested = packages("Cargo.lock");
    let template = packages("scaffold/rust/Cargo.lock");
    assert!(template.len() > 20, "{template:?}");
    for (name, version) in template.iter().filter(|(n, _)| n != "{{name}}") {
        assert!(
            tested.contains(&(name.clone(), version.clone())),
            "handlers/scaffold/rust/Cargo.lock has {name} {version}, which handlers/Cargo.lock does not"
        );
    }
}

/// `handler run --config FILE --handler NAME` runs with that entry's roles, limits and config table;
/// flags still override; an unknown name lists the known ones.
#[test]
fn handler_run_takes_an_entry_of_the_config() {
    let (_dir, path) = config_file(&format!(
        r#"
[[handlers]]
name = "greeter"
file = "{}"
roles = ["task_write"]
timeout = "2s"
config = {{ reply_to = "nova:task:greeter:replies" }}
"#,
        root().join("handlers/build/template.wasm").display()
    ));
    let cfg = path.to_str().unwrap();
    let (code, out, err) = redstream(&[
        "--config",
        cfg,
        "handler",
        "run",
        "--handler",
        "greeter",
        "--message",
        r#"{"greet":"you"}"#,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["replies"][0]["stream"], "nova:task:greeter:replies");
    assert_eq!(v["replies"][0]["fields"]["greeting"], "hello, you");
    // The entry's roles, not admin: a reply outside them is denied.
    let (code, out, _) = redstream(&[
        "--config",
        cfg,
        "handler",
        "run",
        "--handler",
        "greeter",
        "--message",
        r#"{"greet":"you"}"#,
        "--set",
        "reply_to=nova:devops:ops:alerts",
    ]);
    assert_eq!(code, Some(1));
    assert!(out.contains("reply refused: denied"), "{out}");
    let (code, _, err) = redstream(&[
        "--config",
        cfg,
        "handler",
        "run",
        "--handler",
        "nope",
        "--message",
        "{}",
    ]);
    assert_eq!(code, Some(78));
    assert!(
        err.contains(r#"no [[handlers]] entry named "nope" (it has: greeter)"#),
        "{err}"
    );
}

/// A process's output as it comes, line by line, from a thread per pipe.
fn collect(pipe: impl std::io::Read + Send + 'static) -> Output {
    use std::io::BufRead as _;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let into = seen.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    seen
}

/// Whether `pid` runs (a zombie, dead but not yet reaped by whoever inherited it, does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// The pid following `label` in `text` ("pid 123").
fn pid_after(text: &str, label: &str) -> u32 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
        + label.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no pid after {label:?} in {text}"))
}

/// `handler dev --send` on a built project: the first case's reply is printed; Ctrl-C ends it with 0.
/// `handler dev PROJECT [--send]`, its stdout and stderr collected as they come. The author's own
/// `REDSTREAM_*` environment (a Redis that does not answer) must not reach what it starts.
type Output = std::sync::Arc<std::sync::Mutex<String>>;
fn spawn_dev(project: &Path, send: bool) -> (std::process::Child, Output, Output) {
    use std::process::Stdio;
    let mut cmd = Command::new(bin());
    cmd.args(["handler", "dev"]).arg(project);
    if send {
        cmd.arg("--send");
    }
    let mut child = cmd
        .env_remove("REDSTREAM_CONFIG")
        .env("REDSTREAM_REDIS__URL", "redis://127.0.0.1:1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    (child, out, err)
}

fn dev_answers_the_first_case(project: &Path, name: &str) {
    let (mut dev, out, err) = spawn_dev(project, true);
    let replies = format!("nova:task:{name}:replies ");
    let until = std::time::Instant::now() + Duration::from_secs(300);
    while !out
        .lock()
        .unwrap()
        .lines()
        .any(|l| l.starts_with(&replies) && l.contains(r#""greeting":"hello, you""#))
    {
        assert!(
            std::time::Instant::now() < until && dev.try_wait().unwrap().is_none(),
            "{name}: no reply from handler dev:\n{}\n--- stderr\n{}",
            out.lock().unwrap(),
            err.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-INT", &dev.id().to_string()])
        .status();
    let status = crate::util::wait_for("handler dev to exit", Duration::from_secs(30), || {
        dev.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0), "{name}: {}", err.lock().unwrap());
}

/// From `handler new` to the handler's replies in a running local pipeline with one more command:
/// `handler dev --send` builds, tests, starts a private redis-server and a daemon with the project's
/// handler.toml deployed, sends the first case and prints the reply; the author's token (in
/// .redstream-dev/env) publishes and reads status within the handler's roles and no further; a source
/// change is rebuilt, tested and redeployed, and the first case's new reply printed; Ctrl-C stops the
/// daemon and the redis-server, and a kill -9 of `handler dev` takes them down with it.
#[test]
fn handler_dev_runs_a_new_project_in_a_local_pipeline_and_follows_its_changes() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().to_str().unwrap();
    let (code, out, err) = redstream(&["handler", "new", "greeter", "--lang", "rust", "--dir", at]);
    assert_eq!(code, Some(0), "{out}{err}");
    let project = dir.path().join("greeter");
    let (dev, out, err) = spawn_dev(&project, true);
    let dev = std::cell::RefCell::new(dev);
    let shown = || {
        format!(
            "{}\n--- stderr\n{}",
            out.lock().unwrap(),
            err.lock().unwrap()
        )
    };
    let seen = |what: &str, limit: Duration, wanted: &dyn Fn(&str) -> bool| {
        let until = std::time::Instant::now() + limit;
        loop {
            let o = out.lock().unwrap().clone();
            if wanted(&o) {
                return o;
            }
            assert!(
                std::time::Instant::now() < until,
                "timed out waiting for {what}:\n{}",
                shown()
            );
            if let Some(status) = dev.borrow_mut().try_wait().unwrap() {
                panic!("handler dev exited ({status}) before {what}:\n{}", shown());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let o = seen("the first case's reply", Duration::from_secs(600), &|o| {
        o.lines().any(|l| {
            l.starts_with("nova:task:greeter:replies ") && l.contains(r#""greeting":"hello, you""#)
        })
    });
    assert!(o.contains("2 of 2 cases passed"), "{}", shown());
    let (redis_pid, daemon_pid) = (
        pid_after(&o, "private redis-server, pid "),
        pid_after(&o, "daemon   pid "),
    );
    assert!(alive(redis_pid) && alive(daemon_pid));

    // The author acts with the token the loop issued: publishes to the handler's stream, reads
    // status, and is refused outside the handler's domain.
    let env = std::fs::read_to_string(project.join(".redstream-dev/env")).unwrap();
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .unwrap_or_else(|| panic!("no {name} in {env}"))
            .to_owned()
    };
    let author = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .env("REDSTREAM_CONFIG", var("REDSTREAM_CONFIG"))
            .env("REDSTREAM_TOKEN", var("REDSTREAM_TOKEN"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, said) = author(&["publish", "nova:task:greeter:requests", "greet=author"]);
    assert_eq!(code, Some(0), "{said}");
    seen(
        "the author's message's reply",
        Duration::from_secs(30),
        &|o| o.contains(r#""greeting":"hello, author""#),
    );
    let (code, said) = author(&["status"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("greeter"), "{said}");
    let (code, said) = author(&["publish", "nova:agent:planner:inbox", "note=x"]);
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("agent_write"), "{said}");

    // A change: rebuilt, tested (the example case now fails, and says so), redeployed, and the first
    // case sent again to the reloaded handler.
    let lib = project.join("src/lib.rs");
    let text = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, text.replace("hello, {who}", "hi, {who}")).unwrap();
    let o = seen(
        "the changed handler's reply",
        Duration::from_secs(300),
        &|o| {
            o.lines().any(|l| {
                l.starts_with("nova:task:greeter:replies ") && l.contains(r#""greeting":"hi, you""#)
            })
        },
    );
    assert!(
        o.contains("src/lib.rs changed: rebuilding") && o.contains("1 of 2 cases passed"),
        "{}",
        shown()
    );
    assert!(
        err.lock().unwrap().contains("reloaded the config"),
        "{}",
        shown()
    );

    // The handler calls a webhook its config names, on an origin it is granted; a case stubs that
    // origin. The loop serves the stub on loopback, points the config URL there (and grants it), and
    // prints each request; the handler sees the stub's answer.
    let edit = |file: &str, from: &str, to: &str| {
        let path = project.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}:\n{text}");
        std::fs::write(&path, text.replace(from, to)).unwrap();
    };
    edit(
        "Cargo.toml",
        r#"path = "sdk" }"#,
        r#"path = "sdk", features = ["http"] }"#,
    );
    edit(
        "handler.toml",
        "config = { reply_to",
        "allowed_outbound_hosts = [\"https://hooks.example.com\"]\n\
         config = { hook = \"https://hooks.example.com/greeted?by=greeter\", reply_to",
    );
    let mut cases = std::fs::OpenOptions::new()
        .append(true)
        .open(project.join("cases.jsonl"))
        .unwrap();
    writeln!(
        cases,
        r#"{{"name": "tells the hook", "message": {{"greet": "hook"}}, "http": [{{"url": "https://hooks.example.com/greeted?by=greeter", "method": "POST", "status": 202, "body": "noted"}}], "expect": {{"outcome": "success"}}}}"#
    )
    .unwrap();
    drop(cases);
    edit(
        "src/lib.rs",
        "        Reply::new()\n            .text(\"greeting\", &format!(\"hi, {who}\"))",
        "        let hook = redstream_guest::config(\"hook\").unwrap_or_default();\n\
         let told = redstream_guest::http::Request::post(&hook).body(who.as_bytes()).send()?;\n\
         Reply::new()\n            .text(\"hook\", &format!(\"{} {}\", told.status, told.text()))\n\
         .text(\"greeting\", &format!(\"hi, {who}\"))",
    );
    let o = seen(
        "the stubbed webhook's answer",
        Duration::from_secs(300),
        &|o| {
            o.lines().any(|l| {
                l.starts_with("nova:task:greeter:replies ") && l.contains(r#""hook":"202 noted""#)
            })
        },
    );
    assert!(
        o.contains("stubs    handlers[0].config.hook https://hooks.example.com/greeted?by=greeter -> http://127.0.0.1:")
            && o.contains("dev: http POST https://hooks.example.com/greeted?by=greeter (3 bytes, Idempotency-Key redstream:greeter:nova:task:greeter:requests:")
            && o.contains("stub answered 202"),
        "{}",
        shown()
    );

    // Ctrl-C: everything it started stops, and it exits 0.
    let mut dev = dev.into_inner();
    let _ = Command::new("kill")
        .args(["-INT", &dev.id().to_string()])
        .status();
    let status = crate::util::wait_for("handler dev to exit", Duration::from_secs(30), || {
        dev.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0), "{}", shown());
    assert!(!alive(redis_pid) && !alive(daemon_pid), "{}", shown());

    // Killed itself, it takes its children along.
    let (mut dev, out, _err) = spawn_dev(&project, false);
    let o = crate::util::wait_for("handler dev to run again", Duration::from_secs(300), || {
        let o = out.lock().unwrap().clone();
        o.contains("is running").then_some(o)
    });
    let (redis_pid, daemon_pid) = (
        pid_after(&o, "private redis-server, pid "),
        pid_after(&o, "daemon   pid "),
    );
    dev.kill().unwrap();
    dev.wait().unwrap();
    crate::util::wait_for("its children to be gone", Duration::from_secs(10), || {
        (!alive(redis_pid) && !alive(daemon_pid)).then_some(())
    });
}

/// A JavaScript project builds with QuickJS unless it asks for StarlingMonkey. QuickJS ends a call at
/// its first `await`, so an `async` handler there is rejected, naming the engine it needs — never
/// acked with the work after the `await` undone; `console` writes to the log. `--engine` belongs to
/// JavaScript only.
#[test]
fn an_async_javascript_handler_under_quickjs_is_rejected_not_acked() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().to_str().unwrap();
    let (code, out, err) = redstream(&["handler", "new", "later", "--lang", "js", "--dir", at]);
    assert_eq!(code, Some(0), "{out}{err}");
    let project = dir.path().join("later");
    let manifest = std::fs::read_to_string(project.join("package.json")).unwrap();
    assert!(manifest.contains("\"componentize-qjs\""), "{manifest}");
    std::fs::write(
        project.join("src/handler.js"),
        r#"import { handler, Reply, config } from './redstream.js';

export const handle = handler(async (msg) => {
  new Reply().text('before', 'await').send(config('reply_to'));
  await Promise.resolve();
  new Reply().text('after', 'await').send(config('reply_to'));
});
"#,
    )
    .unwrap();
    let p = project.to_str().unwrap();
    let (code, out, err) = redstream(&["handler", "build", p]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = redstream(&["handler", "run", p, "--message", r#"{"greet":"you"}"#]);
    assert_eq!(code, Some(1), "{out}{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["outcome"], "reject", "{out}");
    assert!(
        run["reason"]
            .as_str()
            .unwrap()
            .contains("--engine starlingmonkey"),
        "{out}"
    );
    assert_eq!(run["replies"], serde_json::json!([]), "{out}");

    // QuickJS has no console of its own: the SDK gives it one that writes to RedStream's log.
    std::fs::write(
        project.join("src/handler.js"),
        r#"import { handler } from './redstream.js';

export const handle = handler((msg) => {
  console.log('seen', msg.id, 42);
  console.warn('careful');
});
"#,
    )
    .unwrap();
    let (code, out, err) = redstream(&["handler", "build", p]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = redstream(&["handler", "run", p, "--message", r#"{"greet":"you"}"#]);
    assert_eq!(code, Some(0), "{out}{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        run["output"],
        serde_json::json!([
            {"at": "log:info", "text": "seen 0-1 42"},
            {"at": "log:warn", "text": "careful"},
        ]),
        "{out}"
    );

    let (code, _, err) = redstream(&[
        "handler", "new", "oxide", "--lang", "rust", "--engine", "quickjs", "--dir", at,
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--engine quickjs is for --lang js"), "{err}");
}

/// QuickJS has no TextEncoder or TextDecoder; the JS SDK's own UTF-8 conversion must agree with them
/// (checked here under Node, with the native ones as the reference): the same bytes for every string,
/// a lone surrogate included, and the same refusal of bytes that are not UTF-8.
#[test]
fn the_javascript_sdk_converts_utf8_as_text_encoder_does() {
    let script = r#"
const src = require('fs').readFileSync(process.argv[1], 'utf8');
const body = src.slice(src.indexOf('function utf8(s)'), src.indexOf('// QuickJS has no console'));
const encoder = undefined, decoder = undefined;
const { utf8, fromUtf8 } = new Function('encoder', 'decoder', body + 'return { utf8, fromUtf8 };')(encoder, decoder);
const te = new TextEncoder(), td = new TextDecoder('utf-8', { fatal: true });
const bad = [];
for (const s of ['', 'abc', 'héllo ✓', '😀 x', '%41+&=', 'a\ud800b', '\u0000z', 'é'.repeat(20000)]) {
  const b = te.encode(s);
  if (!Buffer.from(utf8(s)).equals(Buffer.from(b))) bad.push(`utf8 ${JSON.stringify(s).slice(0, 20)}`);
  if (fromUtf8(b) !== td.decode(b)) bad.push(`fromUtf8 ${JSON.stringify(s).slice(0, 20)}`);
}
for (const bytes of [[0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xe2, 0x82], [0xf4, 0x90, 0x80, 0x80], [0x61, 0x80]]) {
  try { fromUtf8(new Uint8Array(bytes)); bad.push(`accepted ${bytes}`); } catch {}
}
console.log(bad.length ? bad.join('\n') : 'agree');
"#;
    let sdk = root().join("handlers/sdk-js/redstream.js");
    let out = Command::new("node")
        .args(["-e", script, sdk.to_str().unwrap()])
        .output()
        .expect("node (the JavaScript handler tests need Node.js)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text.trim(), "agree", "{text}");
}
