//! Log destinations: journald with its fields (a private journald), a rolling file written in the
//! background, and the fallback to stderr when JOURNAL_STREAM is set but journald is not there.

use std::time::Duration;

use crate::util::{Daemon, RedisServer, daemon_toml};

const CONSUMER: &str =
    "[[consumers]]\nstream = \"nova:task:log:in\"\ngroup = \"g\"\nhandler = \"drop\"\n";

#[test]
fn a_rolling_log_file_receives_the_log() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = daemon_toml(&server.url(), CONSUMER).replace(
        "[redis]\n",
        &format!(
            "[log]\ndir = \"{}\"\nrotation = \"daily\"\nkeep = 3\n\n[redis]\n",
            dir.path().display()
        ),
    );
    let mut d = Daemon::running(&toml, &[("RUST_LOG", "info")]);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().to_string_lossy().into_owned();
    assert!(
        name.starts_with("redstream.") && name.ends_with(".log"),
        "{name}"
    );
    let text = std::fs::read_to_string(files[0].path()).unwrap();
    assert!(
        text.contains("redstream running") && text.contains("drained"),
        "flushed at exit:\n{text}"
    );
    assert!(!text.contains('\u{1b}'), "no colour codes in files");
}

#[test]
#[ignore = "needs root"]
fn without_journald_the_log_stays_on_stderr() {
    // Where a journald runs, the daemon gets a private mount namespace in which its socket directory
    // is an empty tmpfs: journald is absent for the daemon alone. That needs root.
    const JOURNAL_DIR: &str = "/run/systemd/journal";
    let hide = "mount -t tmpfs tmpfs /run/systemd/journal && exec \"$0\" \"$@\"";
    let wrapper: &[&str] = if !std::path::Path::new(JOURNAL_DIR).join("socket").exists() {
        &[]
    } else {
        crate::util::assert_root("hiding journald from the daemon (unshare -m)");
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            hide,
        ]
    };
    let server = RedisServer::start();
    let mut d = Daemon::running_wrapped(
        &daemon_toml(&server.url(), CONSUMER),
        &[("JOURNAL_STREAM", "8:12345")],
        wrapper,
    );
    assert!(
        d.wait_log("journald is unreachable", Duration::from_secs(1)),
        "{}",
        d.logs().join("\n")
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A value a publisher wrote cannot forge log lines: the echo handler rejects a message whose
/// `_reply_to` is not a stream name, quoting it in the dead-letter reason, and the daemon logs that
/// reason escaped — the publisher's newline stays inside the one line.
#[test]
fn a_publisher_newline_in_a_reason_never_starts_a_log_line() {
    let server = RedisServer::start();
    let echo = crate::util::root().join("handlers/build/echo.wasm");
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[[handlers]]\nname = \"echo\"\nfile = \"{}\"\nroles = [\"task_write\"]\n\
             [[consumers]]\nstream = \"nova:task:log:in\"\ngroup = \"g\"\nstart = \"0\"\nhandler = \"echo\"\n",
            echo.display()
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    server.xadd(
        "nova:task:log:in",
        &[(
            "_reply_to",
            "x\nFORGED level=ERROR the daemon was compromised",
        )],
    );
    crate::util::wait_for("the dead letter", Duration::from_secs(10), || {
        (server.xlen("nova:task:log:in-dlq") == 1).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    let logs = d.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("dead-lettered") && l.contains("FORGED")),
        "the reason is logged: {logs:#?}"
    );
    assert!(
        logs.iter().all(|l| !l.starts_with("FORGED")),
        "a forged line: {logs:#?}"
    );
}

/// Under systemd, logs go to journald with the fields README's `journalctl` examples filter on. A
/// private systemd-journald serves a private mount namespace (tmpfs over /run and the persistent
/// journal directory, so nothing global changes); the daemon runs in it with JOURNAL_STREAM set, and
/// `journalctl -o json` in the same namespace reads back what it stored. Needs root.
#[test]
#[ignore = "needs root"]
fn journald_stores_the_fields_operators_filter_on() {
    crate::util::assert_root("starting a private systemd-journald (unshare -m)");
    let journald = "/lib/systemd/systemd-journald";
    assert!(
        std::path::Path::new(journald).exists(),
        "{journald} (Debian's systemd package, installed by scripts/setup)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("journald.pid");
    let private = format!(
        "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal /run/log/journal; \
         if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi; \
         {journald} </dev/null >/dev/null 2>&1 & echo $! > {pid}; \
         i=0; while [ ! -S /run/systemd/journal/socket ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; \
         exec \"$0\" \"$@\"",
        pid = pidfile.display()
    );
    let server = RedisServer::start();
    let consumers = "[[consumers]]\nstream = \"nova:task:journal:in\"\ngroup = \"journal\"\nstart = \"0\"\n\
         block = \"500ms\"\nclaim_min_idle = \"1s\"\nclaim_interval = \"200ms\"\nhandler_timeout = \"500ms\"\n\
         max_deliveries = 2\nhandler = \"faults\"\n\
         faults = { reply_to = \"nova:task:journal:out\", fail_field = \"poison\" }\n";
    let mut d = Daemon::start_wrapped(
        &daemon_toml(&server.url(), consumers),
        &[("JOURNAL_STREAM", "8:12345")],
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &private,
        ],
    );
    let good = server.xadd("nova:task:journal:in", &[("n", "1")]);
    let poison = server.xadd(
        "nova:task:journal:in",
        &[("poison", "1"), ("_trace_id", "trace-journal-7")],
    );
    crate::util::wait_for("the poison dead-lettered", Duration::from_secs(20), || {
        (server.xlen("nova:task:journal:in-dlq") == 1 && server.xlen("nova:task:journal:out") == 1)
            .then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert!(
        d.logs().iter().all(|l| !l.contains("redstream running")),
        "under journald nothing goes to stderr: {:?}",
        d.logs()
    );
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
    // journald outlives the daemon (it holds the namespace); it is stopped however the test ends.
    struct Stop(String);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill").arg(&self.0).status();
        }
    }
    let _journald = Stop(pid.clone());
    // journalctl in journald's namespace, with README's field filters.
    let query = |filters: &[&str]| -> Vec<serde_json::Value> {
        let out = std::process::Command::new("nsenter")
            .args([
                "-t",
                &pid,
                "-m",
                "journalctl",
                "-D",
                "/run/log/journal",
                "-o",
                "json",
            ])
            .args(["--no-pager", "SYSLOG_IDENTIFIER=redstream"])
            .args(filters)
            .output()
            .expect("nsenter journalctl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let all = crate::util::wait_for(
        "the daemon's lines in the journal",
        Duration::from_secs(5),
        || {
            let got = query(&[]);
            got.iter()
                .any(|e| e["MESSAGE"] == "redstream running")
                .then_some(got)
        },
    );
    let field = |e: &serde_json::Value, k: &str| e[k].as_str().map(str::to_owned);
    // journalctl GROUP=… STREAM=… OUTCOME=dead-lettered: the dead letter, naming its message.
    let dead = query(&[
        "STREAM=nova:task:journal:in",
        "GROUP=journal",
        "OUTCOME=dead-lettered",
    ]);
    assert_eq!(dead.len(), 1, "one dead-letter line: {dead:?}");
    let e = &dead[0];
    assert_eq!(
        field(e, "MESSAGE_ID").as_deref(),
        Some(poison.as_str()),
        "{e}"
    );
    assert_eq!(field(e, "HANDLER").as_deref(), Some("faults"), "{e}");
    // The text alone (journalctl -u redstream, no -o verbose) names the message, where it was, and why;
    // REASON holds the reason itself, without quotes.
    let text = field(e, "MESSAGE").unwrap_or_default();
    let reason = field(e, "REASON").unwrap_or_default();
    assert!(
        text.contains(poison.as_str())
            && text.contains("nova:task:journal:in")
            && text.contains("journal")
            && text.contains(&reason),
        "{text}"
    );
    assert!(!reason.starts_with('"') && !reason.is_empty(), "{reason}");
    assert_eq!(
        field(e, "TRACE_ID").as_deref(),
        Some("trace-journal-7"),
        "{e}"
    );
    assert_eq!(
        field(e, "PRIORITY").as_deref(),
        Some("4"),
        "WARN is priority 4: {e}"
    );
    assert!(
        field(e, "CONSUMER").is_some_and(|c| c.starts_with("test-daemon")),
        "{e}"
    );
    // journalctl MESSAGE_ID=… and TRACE_ID=…: everything about the message, its retry included.
    let by_id = query(&[&format!("MESSAGE_ID={poison}")]);
    assert!(
        by_id
            .iter()
            .any(|e| field(e, "OUTCOME").as_deref() == Some("retry")),
        "{by_id:?}"
    );
    assert_eq!(query(&["TRACE_ID=trace-journal-7"]).len(), by_id.len());
    // journalctl HANDLER=… -p warning: the retry and the dead letter, not the start-up lines.
    let warnings = query(&["HANDLER=faults", "-p", "warning"]);
    assert!(warnings.len() >= 2, "{warnings:?}");
    assert!(all.len() > warnings.len());
    assert!(query(&[&format!("MESSAGE_ID={good}"), "-p", "warning"]).is_empty());
}
