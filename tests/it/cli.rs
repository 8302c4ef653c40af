//! The `redstream` binary as an operator uses it: exit codes, output formats, config layering.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::util::{RedisServer, bin, root};

fn run(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(root())
        .env_remove("REDSTREAM_CONFIG")
        .env_remove("REDSTREAM_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn redstream");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `check` runs as ExecStartPre, so what it prints lands in the journal: no form of a redis password
/// may appear in it, whether the URL is valid or mistyped.
#[test]
fn check_never_prints_a_password_in_any_url_form() {
    for (url, valid) in [
        ("redis://app:s3cret@127.0.0.1:6379/0", true),
        ("unix:///run/redis/redis.sock?db=1&pass=s3cret", true),
        ("redis://app:s3cret@host:port/0", false),
        ("redis://app:s3cret@[::1/0", false),
    ] {
        let out = run(
            &["check", "--config", "config/redstream.toml"],
            &[("REDSTREAM_REDIS__URL", url)],
            None,
        );
        let (stdout, stderr) = text(&out);
        let expected = if valid { 0 } else { 78 };
        assert_eq!(out.status.code(), Some(expected), "{url}: {stdout}{stderr}");
        assert!(
            !stdout.contains("s3cret") && !stderr.contains("s3cret"),
            "{url}: {stdout}{stderr}"
        );
        if !valid {
            assert!(stderr.contains("redis.url"), "{stderr}");
        }
    }
}

#[test]
fn check_accepts_the_reference_config_and_names_a_broken_key() {
    let ok = run(&["check", "--config", "config/redstream.toml"], &[], None);
    assert_eq!(ok.status.code(), Some(0), "{:?}", text(&ok));
    let ok = run(&["check", "--config", "config/dev.toml"], &[], None);
    assert_eq!(ok.status.code(), Some(0), "{:?}", text(&ok));

    // One key broken through the environment.
    let bad = run(
        &["check", "--config", "config/redstream.toml"],
        &[("REDSTREAM_REDIS__COMMAND_TIMEOUT", "soon")],
        None,
    );
    let (_, err) = text(&bad);
    assert_eq!(bad.status.code(), Some(78), "{err}");
    assert!(
        err.contains("redis.command_timeout") && err.contains("REDSTREAM_REDIS__COMMAND_TIMEOUT"),
        "{err}"
    );

    // One key broken in the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    let reference = std::fs::read_to_string(root().join("config/redstream.toml")).unwrap();
    std::fs::write(
        &file,
        reference.replace("startup_wait = \"30s\"", "startup_wait = \"forever\""),
    )
    .unwrap();
    let bad = run(&["check", "--config", file.to_str().unwrap()], &[], None);
    let (_, err) = text(&bad);
    assert_eq!(bad.status.code(), Some(78), "{err}");
    assert!(
        err.contains("redis.startup_wait")
            && err.contains("forever")
            && err.contains("broken.toml"),
        "{err}"
    );

    let missing = run(
        &["check", "--config", "/nonexistent/redstream.toml"],
        &[],
        None,
    );
    assert_eq!(missing.status.code(), Some(78));
    let via_env = run(
        &["check"],
        &[("REDSTREAM_CONFIG", "/nonexistent.toml")],
        None,
    );
    assert_eq!(via_env.status.code(), Some(78));
    assert!(text(&via_env).1.contains("REDSTREAM_CONFIG"));
}

#[test]
fn publish_read_groups_pending_as_an_operator_would() {
    let server = RedisServer::start();
    let url = server.url();
    let env = [("REDSTREAM_REDIS__URL", url.as_str())];
    let dev = ["--config", "config/dev.toml"];
    let s = "nova:task:cli:jobs";
    let cli = |args: &[&str], stdin: Option<&str>| {
        let all: Vec<&str> = args.iter().chain(dev.iter()).copied().collect();
        run(&all, &env, stdin)
    };

    let first = cli(&["publish", s, "type=task_created", "task_id=1"], None);
    assert_eq!(first.status.code(), Some(0), "{:?}", text(&first));
    let first_id = text(&first).0.trim().to_owned();
    assert!(first_id.contains('-'), "prints the entry id: {first_id}");
    let second = cli(
        &["publish", s, "--json", "-", "extra=yes", "--maxlen", "1000"],
        Some(r#"{"task": {"id": 2}, "n": 5}"#),
    );
    assert_eq!(second.status.code(), Some(0), "{:?}", text(&second));

    let read = cli(&["read", s, "--reverse", "--count", "5"], None);
    assert_eq!(read.status.code(), Some(0));
    let lines: Vec<Value> = text(&read)
        .0
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]["fields"]["task"]["id"], 2,
        "newest first, objects as JSON"
    );
    assert_eq!(lines[0]["fields"]["extra"], "yes");
    assert_eq!(lines[1]["id"], first_id.as_str());
    assert_eq!(lines[1]["fields"]["_source"], "redstream-dev");

    let mut conn = server.conn();
    let _: String = redis::cmd("XGROUP")
        .arg(&["CREATE", s, "workers", "0"])
        .query(&mut conn)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP", "workers", "alice", "COUNT", "10", "STREAMS", s, ">",
        ])
        .query(&mut conn)
        .unwrap();
    let groups = cli(&["groups", s], None);
    let (out, _) = text(&groups);
    assert!(
        out.contains("workers") && out.contains("CONSUMERS"),
        "{out}"
    );
    let groups = cli(&["groups", s, "--json"], None);
    let g: Value = serde_json::from_str(text(&groups).0.trim()).unwrap();
    assert_eq!(
        (g["name"].as_str(), g["pending"].as_u64()),
        (Some("workers"), Some(2))
    );
    let pending = cli(&["pending", s, "workers", "--json"], None);
    let p: Value = serde_json::from_str(text(&pending).0.trim()).unwrap();
    assert_eq!(p["count"], 2);
    assert_eq!(p["consumers"][0][0], "alice");
    let detail = cli(&["pending", s, "workers", "--detail"], None);
    assert!(text(&detail).0.contains("alice"), "{:?}", text(&detail));
    let streams = cli(&["streams", "nova:task:*"], None);
    assert_eq!(text(&streams).0.trim(), s);

    let bad_name = cli(&["publish", "nova:devops:general", "a=1"], None);
    assert_eq!(bad_name.status.code(), Some(1));
    assert!(
        text(&bad_name)
            .1
            .contains("nova:{domain}:{entity}:{function}")
    );
    let bad_field = cli(&["publish", s, "novalue"], None);
    assert_eq!(bad_field.status.code(), Some(2), "clap usage error");
}

#[test]
fn tokens_from_api_keys_act_with_their_roles() {
    let server = RedisServer::start();
    let url = server.url();
    let dev = ["--config", "config/dev.toml"];
    let redis_env = ("REDSTREAM_REDIS__URL", url.as_str());

    // The demo key of config/dev.toml may be issued task_write, task_read and system_read.
    let issue = run(
        &["token", "issue", "--ttl", "10m", dev[0], dev[1]],
        &[("REDSTREAM_API_KEY", "rsk_dev_demo_key")],
        None,
    );
    assert_eq!(issue.status.code(), Some(0), "{:?}", text(&issue));
    let token = text(&issue).0.trim().to_owned();
    // An API key typed on the command line (readable by every local user) is refused; stdin works.
    let typed = run(
        &[
            "token",
            "issue",
            "--api-key",
            "rsk_dev_demo_key",
            dev[0],
            dev[1],
        ],
        &[],
        None,
    );
    assert_eq!(typed.status.code(), Some(1), "{:?}", text(&typed));
    assert!(
        text(&typed).1.contains("--api-key-file"),
        "{:?}",
        text(&typed)
    );
    let piped = run(
        &["token", "issue", "--api-key", "-", dev[0], dev[1]],
        &[],
        Some("rsk_dev_demo_key\n"),
    );
    assert_eq!(piped.status.code(), Some(0), "{:?}", text(&piped));
    // token verify reads the token from stdin, $REDSTREAM_TOKEN or a file, as well as an argument.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &token).unwrap();
    let path = file.path().to_str().unwrap();
    for (args, env, stdin) in [
        (vec!["token", "verify", "-"], vec![], Some(token.as_str())),
        (
            vec!["token", "verify"],
            vec![("REDSTREAM_TOKEN", token.as_str())],
            None,
        ),
        (vec!["token", "verify", "--token-file", path], vec![], None),
    ] {
        let args: Vec<&str> = args.into_iter().chain(dev).collect();
        let v = run(&args, &env, stdin);
        assert_eq!(v.status.code(), Some(0), "{args:?}: {:?}", text(&v));
        let claims: Value = serde_json::from_str(text(&v).0.trim()).unwrap();
        assert_eq!(claims["subject"], "demo@dev");
    }
    let verify = run(&["token", "verify", &token, dev[0], dev[1]], &[], None);
    assert!(text(&verify).1.contains("readable by every local user"));
    let claims: Value = serde_json::from_str(text(&verify).0.trim()).unwrap();
    assert_eq!(claims["subject"], "demo@dev");
    assert_eq!(
        claims["roles"],
        serde_json::json!(["system_read", "task_read", "task_write"])
    );
    // Enough for `redstream status`, which reads the heartbeat stream.
    let status = run(
        &["status", dev[0], dev[1]],
        &[redis_env, ("REDSTREAM_TOKEN", &token)],
        None,
    );
    assert_eq!(status.status.code(), Some(0), "{:?}", text(&status));

    let published = run(
        &["publish", "nova:task:cli:tok", "a=1", dev[0], dev[1]],
        &[redis_env, ("REDSTREAM_TOKEN", &token)],
        None,
    );
    assert_eq!(published.status.code(), Some(0), "{:?}", text(&published));
    let read = run(
        &[
            "read",
            "nova:task:cli:tok",
            "--token",
            &token,
            dev[0],
            dev[1],
        ],
        &[redis_env],
        None,
    );
    let line: Value = serde_json::from_str(text(&read).0.trim()).unwrap();
    assert_eq!(
        line["fields"]["_source"], "demo@dev",
        "publishes as the token's identity"
    );
    // A token on the command line works, with a warning (any local user can read argv); from the
    // environment, a file or stdin, without one.
    assert!(text(&read).1.contains("--token-file"), "{:?}", text(&read));
    assert!(
        !text(&published).1.contains("warning"),
        "{:?}",
        text(&published)
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let from_file = run(
        &[
            "read",
            "nova:task:cli:tok",
            "--token-file",
            file.to_str().unwrap(),
            dev[0],
            dev[1],
        ],
        &[redis_env],
        None,
    );
    let from_stdin = run(
        &["read", "nova:task:cli:tok", "--token", "-", dev[0], dev[1]],
        &[redis_env],
        Some(&format!("{token}\n")),
    );
    for out in [&from_file, &from_stdin] {
        let (stdout, stderr) = text(out);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(!stderr.contains("warning"), "{stderr}");
        let line: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(line["fields"]["_source"], "demo@dev");
    }
    let denied = run(
        &[
            "publish",
            "nova:agent:cli:tok",
            "a=1",
            "--token",
            &token,
            dev[0],
            dev[1],
        ],
        &[redis_env],
        None,
    );
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        text(&denied).1.contains("agent_write"),
        "{:?}",
        text(&denied)
    );

    let too_much = run(
        &["token", "issue", "--role", "admin", dev[0], dev[1]],
        &[("REDSTREAM_API_KEY", "rsk_dev_demo_key")],
        None,
    );
    assert_eq!(too_much.status.code(), Some(1));
    let too_long = run(
        &["token", "issue", "--ttl", "30d", dev[0], dev[1]],
        &[("REDSTREAM_API_KEY", "rsk_dev_demo_key")],
        None,
    );
    assert_eq!(too_long.status.code(), Some(1));
    assert!(text(&too_long).1.contains("max_token_ttl"));
    let wrong_key = run(
        &["token", "issue", dev[0], dev[1]],
        &[("REDSTREAM_API_KEY", "rsk_guess")],
        None,
    );
    assert_eq!(wrong_key.status.code(), Some(1));
    assert!(text(&wrong_key).1.contains("invalid API key"));

    // A forged token (signed with another secret) is refused and writes nothing.
    let forged = token
        .rsplit_once('.')
        .map(|(head, _)| format!("{head}.AAAA"))
        .unwrap();
    let refused = run(
        &[
            "publish",
            "nova:task:cli:forged",
            "a=1",
            "--token",
            &forged,
            dev[0],
            dev[1],
        ],
        &[redis_env],
        None,
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused).1.contains("bad signature"),
        "{:?}",
        text(&refused)
    );
    let mut conn = server.conn();
    let exists: i64 = redis::cmd("EXISTS")
        .arg("nova:task:cli:forged")
        .query(&mut conn)
        .unwrap();
    assert_eq!(exists, 0);

    // A new API key, provisioned the documented way.
    let new = run(
        &[
            "token",
            "new-api-key",
            "--name",
            "bob",
            "--identity",
            "bob@ops",
            "--role",
            "task_read",
        ],
        &[],
        None,
    );
    let out = text(&new).0;
    let key = out
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches('#')
        .trim()
        .to_owned();
    assert!(key.starts_with("rsk_"), "{out}");
    let entry: String = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let dev_toml = std::fs::read_to_string(root().join("config/dev.toml"))
        .unwrap()
        .replace(
            "\"../handlers/",
            &format!("\"{}/handlers/", root().display()),
        );
    std::fs::write(&cfg, format!("{dev_toml}\n{entry}\n")).unwrap();
    let issued = run(
        &["token", "issue", "--config", cfg.to_str().unwrap()],
        &[("REDSTREAM_API_KEY", &key)],
        None,
    );
    assert_eq!(issued.status.code(), Some(0), "{:?}", text(&issued));
}

#[test]
fn unreachable_redis_exits_69() {
    let url = crate::util::UNREACHABLE.to_string();
    let out = run(
        &[
            "publish",
            "nova:task:cli:down",
            "a=1",
            "--config",
            "config/dev.toml",
        ],
        &[
            ("REDSTREAM_REDIS__URL", url.as_str()),
            ("REDSTREAM_REDIS__CONNECT_TIMEOUT", "500ms"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(69), "{:?}", text(&out));
    let check = run(
        &["check", "--redis", "--config", "config/dev.toml"],
        &[
            ("REDSTREAM_REDIS__URL", url.as_str()),
            ("REDSTREAM_REDIS__STARTUP_WAIT", "1s"),
        ],
        None,
    );
    assert_eq!(check.status.code(), Some(69), "{:?}", text(&check));
}

/// `redstream man` and `redstream completions` come from the clap definitions: every command has a
/// page, and the completion scripts know the subcommands.
#[test]
fn manual_pages_and_completions_cover_every_command() {
    let out = std::process::Command::new(crate::util::bin())
        .arg("man")
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(page.contains(".TH redstream 1"), "{page}");
    for sub in ["run", "check", "publish", "handler", "dlq", "token"] {
        assert!(page.contains(sub), "redstream(1) does not mention {sub}");
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(crate::util::bin())
        .args(["man", "--out", dir.path().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    for page in [
        "redstream.1",
        "redstream-handler-new.1",
        "redstream-dlq-replay.1",
        "redstream-check.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH "), "{page}");
    }
    // Every page renders without a warning (groff -ww; -k for the UTF-8 in help texts).
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let out = std::process::Command::new("groff")
            .args(["-k", "-man", "-Tutf8", "-z", "-ww"])
            .arg(&path)
            .output()
            .expect("groff (Debian's groff-base, which man-db needs)");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && warnings.is_empty(),
            "{}: {warnings}",
            path.display()
        );
    }
    for (shell, marker) in [
        ("bash", "_redstream()"),
        ("zsh", "#compdef redstream"),
        ("fish", "complete -c redstream"),
    ] {
        let out = std::process::Command::new(crate::util::bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && script.contains(marker),
            "{shell}: {script}"
        );
        assert!(
            script.contains("handler") && script.contains("dlq"),
            "{shell}"
        );
    }
}
