//! The units in systemd/: `systemd-analyze verify` is clean and the offline security exposure is at
//! most 1.5. (scripts/setup installs systemd-analyze where it is missing.)

use std::process::Command;

use crate::util::{bin, root};

/// The unit with ExecStart pointing at the binary under test (verify checks that it exists).
fn staged(unit: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(root().join("systemd").join(unit)).unwrap();
    let path = dir.join(unit);
    std::fs::write(
        &path,
        text.replace("/usr/bin/redstream", &bin().to_string_lossy()),
    )
    .unwrap();
    path
}

/// `systemd-analyze ARGS` run in `dir` (where the units under test are): success, and what it said.
pub fn analyze(args: &[&str], dir: &std::path::Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (installed by scripts/setup)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn units_verify_cleanly_and_are_hardened() {
    let dir = tempfile::tempdir().unwrap();
    for (file, instance) in [
        ("redstream.service", "redstream.service"),
        ("redstream@.service", "redstream@tasks.service"),
    ] {
        staged(file, dir.path());
        let (ok, out) = analyze(&["verify", instance], dir.path());
        assert!(ok && out.trim().is_empty(), "verify {instance}: {out}");
        let (_, out) = analyze(&["security", "--offline=true", instance], dir.path());
        let exposure: f64 = out
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in: {out}"));
        println!("{instance}: exposure {exposure}");
        assert!(
            exposure <= 1.5,
            "{instance} exposure {exposure} > 1.5:\n{out}"
        );
    }
    let unit = std::fs::read_to_string(root().join("systemd/redstream.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "ExecReload=",
        "LoadCredential=",
        // An absent credential file must not fail the start (243/CREDENTIALS).
        "SetCredential=redis-password:\\n",
        "SetCredential=jwt-signing-key:\\n",
    ] {
        assert!(unit.contains(line), "redstream.service lacks {line}");
    }
}
