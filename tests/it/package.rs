//! The Debian package: `scripts/package` builds it (here around the test binary), `dpkg` installs it
//! into a scratch root (`--root`, maintainer scripts run chrootless with `$DPKG_ROOT`), and what lands
//! there is a service: `systemd-analyze verify` accepts the installed units, `redstream check` the
//! installed config — also after the one edit a user makes (a consumer running a shipped handler).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::util::{bin, root};

pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The package around this build's binary, in `dir`: scripts/package --no-build packages
/// $CARGO_TARGET_DIR/release/redstream as it is.
pub(crate) fn build_deb(dir: &Path) -> std::path::PathBuf {
    let target = dir.join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::fs::copy(bin(), target.join("release/redstream")).unwrap();
    let deb = dir.join("redstream.deb");
    run(Command::new(root().join("scripts/package"))
        .args(["--no-build", "--fast", "--output"])
        .arg(&deb)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(root()));
    deb
}

#[test]
#[ignore = "needs root"]
fn the_package_installs_a_service_that_systemd_and_check_accept() {
    crate::util::assert_root("installing the package with dpkg");
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(tmp.path());
    // ExecReload= runs /bin/kill, which minimal Debian roots (containers, debootstrap) lack.
    let depends = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends"));
    assert!(depends.contains("procps"), "Depends: {depends}");

    // Installed into a scratch root: a dpkg database of its own, scripts run with $DPKG_ROOT.
    let sys = tmp.path().join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(sys.join(d)).unwrap();
    }
    std::fs::write(sys.join("var/lib/dpkg/status"), "").unwrap();
    run(Command::new("dpkg")
        .arg(format!("--root={}", sys.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
            "-i",
        ])
        .arg(&deb));
    let conffiles = run(Command::new("dpkg-query")
        .arg(format!("--root={}", sys.display()))
        .args(["-W", "-f=${Conffiles}", "redstream"]));
    assert!(
        conffiles.contains("/etc/redstream/redstream.toml"),
        "the config is a conffile: {conffiles}"
    );
    for (path, want) in [
        ("usr/bin/redstream", 0o755),
        ("etc/redstream/redstream.toml", 0o644),
        ("etc/redstream/credentials", 0o700),
        ("etc/redstream/redstream.d", 0o755),
        ("usr/lib/systemd/system/redstream.service", 0o644),
        ("usr/lib/systemd/system/redstream@.service", 0o644),
        ("usr/lib/redstream/handlers/echo.wasm", 0o644),
        ("usr/lib/redstream/handlers/task-router.wasm", 0o644),
        ("usr/share/man/man1/redstream.1", 0o644),
        ("usr/share/man/man1/redstream-status.1", 0o644),
        ("usr/share/bash-completion/completions/redstream", 0o644),
        ("usr/share/zsh/vendor-completions/_redstream", 0o644),
        ("usr/share/fish/vendor_completions.d/redstream.fish", 0o644),
        ("usr/share/doc/redstream/README.md", 0o644),
    ] {
        assert_eq!(mode(&sys.join(path)), want, "{path}");
    }
    // Installing started nothing: no unit is enabled.
    assert!(
        !sys.join("etc/systemd/system/multi-user.target.wants")
            .exists(),
        "the package enabled a unit"
    );

    // systemd accepts the installed units. (Verified on this host, whose systemd units they refer to:
    // the scratch root has none; only their ExecStart binary is the scratch root's.)
    let redstream = sys.join("usr/bin/redstream");
    let units = tmp.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    for (file, instance) in [
        ("redstream.service", "redstream.service"),
        ("redstream@.service", "redstream@tasks.service"),
    ] {
        let installed =
            std::fs::read_to_string(sys.join("usr/lib/systemd/system").join(file)).unwrap();
        std::fs::write(
            units.join(file),
            installed.replace("/usr/bin/redstream", &redstream.to_string_lossy()),
        )
        .unwrap();
        let (ok, text) = crate::systemd::analyze(&["verify", instance], &units);
        assert!(ok && text.trim().is_empty(), "verify {instance}: {text}");
    }

    // The installed config is valid as shipped, and after the one edit a user makes: an identity and
    // a consumer running a shipped handler (paths under the scratch root).
    let config = sys.join("etc/redstream/redstream.toml");
    run(Command::new(&redstream)
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("REDSTREAM_CONFIG"));
    let shipped = std::fs::read_to_string(&config).unwrap();
    assert!(
        shipped.contains("\nlisten = \"127.0.0.1:9464\""),
        "a fresh install serves metrics on loopback"
    );
    let handlers = sys.join("usr/lib/redstream/handlers");
    let edited = shipped
        .replace(
            "# handlers_dir = \"/usr/lib/redstream/handlers\"",
            &format!("handlers_dir = \"{}\"", handlers.display()),
        )
        .replacen(
            "roles = []",
            "roles = [\"task_read\", \"task_write\", \"system_read\", \"system_write\"]",
            1,
        )
        + "\n[[auth.keys]]\nid = \"k\"\nalgorithm = \"HS256\"\n\
           secret = \"0123456789abcdef0123456789abcdef\"\n\
           [[handlers]]\nname = \"echo\"\nfile = \"echo.wasm\"\nroles = [\"task_write\"]\n\
           [[consumers]]\nstream = \"nova:task:echo:requests\"\ngroup = \"echo\"\nhandler = \"echo\"\n";
    assert_ne!(edited, shipped, "the config names the handlers' directory");
    std::fs::write(&config, edited).unwrap();
    let checked = run(Command::new(&redstream)
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("REDSTREAM_CONFIG")
        .env("REDSTREAM_AUTH__SIGNING_KEY", "k"));
    assert!(
        checked.contains("consumer: nova:task:echo:requests"),
        "{checked}"
    );

    // Removing and purging leave no files of the package behind, and never the operator's secrets.
    std::fs::write(
        sys.join("etc/redstream/credentials/redis-password"),
        "s3cret",
    )
    .unwrap();
    run(Command::new("dpkg")
        .arg(format!("--root={}", sys.display()))
        .args([
            "--force-script-chrootless",
            "--log=/dev/null",
            "--purge",
            "redstream",
        ]));
    assert!(!sys.join("usr/bin/redstream").exists());
    assert!(
        sys.join("etc/redstream/credentials/redis-password")
            .exists(),
        "a purge keeps the operator's secrets"
    );
}
