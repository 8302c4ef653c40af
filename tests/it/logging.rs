//! Log destinations: a rolling file written in the background, and the fallback to stderr when
//! JOURNAL_STREAM is set but journald is not there to take the lines.

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
fn without_journald_the_log_stays_on_stderr() {
    // Where a journald runs, the daemon gets a private mount namespace in which its socket directory
    // is an empty tmpfs: journald is absent for the daemon alone. That needs root.
    const JOURNAL_DIR: &str = "/run/systemd/journal";
    let hide = "mount -t tmpfs tmpfs /run/systemd/journal && exec \"$0\" \"$@\"";
    let wrapper: &[&str] = if !std::path::Path::new(JOURNAL_DIR).join("socket").exists() {
        &[]
    } else if unsafe { libc::geteuid() } == 0 {
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            hide,
        ]
    } else {
        eprintln!(
            "SKIPPED without_journald_the_log_stays_on_stderr: a journald socket exists and hiding it \
             needs root (unshare -m); run the suite as root to cover the stderr fallback"
        );
        return;
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
