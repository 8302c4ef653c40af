//! The .deb under a real systemd: a Debian root (debootstrapped by scripts/setup into
//! target/systemd-root, with systemd and redis-server) booted with `systemd-nspawn --boot` — systemd
//! as PID 1 of its own namespaces, on a private network, the root left untouched (a tmpfs overlay) —
//! the package installed with dpkg, and the service enabled as an operator would. Commands run inside
//! with nsenter into the container's namespaces (no machined or D-Bus needed on the host).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::package::build_deb;
use crate::util::{root, wait_for};

fn systemd_root() -> PathBuf {
    root().join("target/systemd-root")
}

/// A booted container; powered off (then killed) on drop.
struct Container {
    nspawn: Child,
    /// The container's PID 1 (systemd), as the host sees it.
    init: u32,
}

impl Container {
    fn boot(packages: &Path) -> Container {
        let name = format!("redstream-test-{}", std::process::id());
        let nspawn = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(systemd_root())
            .args([
                "--volatile=overlay",
                "--boot",
                "--register=no",
                "--keep-unit",
            ])
            .args(["--private-network", "--console=passive"])
            .arg(format!("--machine={name}"))
            .arg(format!("--bind-ro={}:/mnt/pkg", packages.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn (scripts/setup installs systemd-container)");
        let parent = nspawn.id();
        let init = wait_for("the container's init", Duration::from_secs(30), || {
            let children =
                std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
            let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
            // nspawn's child becomes systemd once it has entered the container (exec).
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "systemd").then_some(pid)
        });
        let c = Container { nspawn, init };
        // Until systemd listens, systemctl cannot connect; then it waits for the boot to finish.
        wait_for("the container to boot", Duration::from_secs(60), || {
            let (_, state) = c.try_sh("systemctl is-system-running --wait");
            let state = state.trim();
            (state == "running" || state == "degraded").then_some(())
        });
        c
    }

    /// Runs `script` with sh inside the container; returns stdout and stderr.
    fn try_sh(&self, script: &str) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg("--target")
            .arg(self.init.to_string())
            .args([
                "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd",
            ])
            .args(["/bin/sh", "-c", script])
            .output()
            .expect("nsenter");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn sh(&self, script: &str) -> String {
        let (ok, text) = self.try_sh(script);
        assert!(ok, "{script}:\n{text}");
        text
    }

    fn main_pid(&self) -> u32 {
        self.sh("systemctl show -P MainPID redstream")
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// The unit's status and last journal lines, for a failure's message.
    fn journal(&self) -> String {
        self.try_sh(
            "systemctl status redstream --no-pager; journalctl -u redstream --no-pager | tail -40",
        )
        .1
    }

    fn active(&self) -> bool {
        self.try_sh("systemctl is-active redstream").1.trim() == "active"
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.try_sh("systemctl poweroff --no-block");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// What the operator adds: an identity with roles, a signing key, and a consumer running the shipped
/// echo handler; a shorter watchdog so its test takes seconds (the shipped unit's is 30 s; pings go at
/// half of it, so a busy machine does not miss them).
const SETUP: &str = r#"set -e
cat > /etc/redstream/redstream.d/10-test.toml <<'EOF'
[identity]
roles = ["task_read", "task_write", "system_read", "system_write"]
[auth]
signing_key = "k"
[[auth.keys]]
id = "k"
algorithm = "HS256"
secret = "0123456789abcdef0123456789abcdef"
[wasm]
handlers_dir = "/usr/lib/redstream/handlers"
[[handlers]]
name = "echo"
file = "echo.wasm"
roles = ["task_write"]
config = { reply_to = "nova:task:echo:replies" }
[[consumers]]
stream = "nova:task:echo:requests"
group = "echo"
handler = "echo"
EOF
mkdir -p /etc/systemd/system/redstream.service.d
printf '[Service]\nWatchdogSec=10s\n' > /etc/systemd/system/redstream.service.d/10-test.conf
systemctl daemon-reload
"#;

#[test]
#[ignore = "needs root"]
fn the_deb_under_a_real_systemd_starts_notifies_restarts_journals_and_reloads() {
    crate::util::assert_root("booting a container with systemd-nspawn");
    assert!(
        systemd_root().join("usr/lib/systemd/systemd").exists(),
        "no Debian root at {}: scripts/setup debootstraps it",
        systemd_root().display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let packages = tmp.path().join("pkg");
    std::fs::create_dir_all(&packages).unwrap();
    let deb = build_deb(tmp.path());
    std::fs::copy(&deb, packages.join("redstream.deb")).unwrap();
    let c = Container::boot(&packages);
    c.sh("systemctl is-active redis-server");

    // Installed, it starts nothing; enabled, it starts — `enable --now` of a Type=notify unit returns
    // once READY=1 arrived — and its STATUS= line is systemd's.
    c.sh("DEBIAN_FRONTEND=noninteractive dpkg -i /mnt/pkg/redstream.deb");
    assert!(!c.active(), "installing started nothing");
    c.sh(SETUP);
    c.sh("systemctl enable --now redstream");
    assert!(c.active());
    let status = c.sh("systemctl show -P StatusText redstream");
    assert!(!status.trim().is_empty(), "a STATUS= line: {status}");
    // Work flows: a request gets its echo.
    c.sh("redis-cli XADD nova:task:echo:requests '*' n 1");
    wait_for("the echo reply", Duration::from_secs(20), || {
        let n = c.sh("redis-cli XLEN nova:task:echo:replies");
        (n.trim() == "1").then_some(())
    });

    // The compiled handler is cached where CacheDirectory= put it (a link into /var/cache/private).
    let journal = c.sh("journalctl -u redstream --no-pager");
    assert!(!journal.contains("cannot cache"), "{journal}");
    // The groups' positions are kept where StateDirectory= put it (daemon::positions).
    wait_for("the positions file", Duration::from_secs(10), || {
        let held = c.sh("cat /var/lib/private/redstream/positions-* 2>/dev/null || true");
        held.contains("nova:task:echo:requests\techo\t")
            .then_some(())
    });
    let journal = c.sh("journalctl -u redstream --no-pager");
    assert!(!journal.contains("cannot write the groups"), "{journal}");
    // journald has the structured fields.
    let journal = c.sh("journalctl -u redstream -o json --no-pager");
    assert!(
        journal.contains("\"STREAM\":\"nova:task:echo:requests\"")
            && journal.contains("\"GROUP\":\"echo\""),
        "journald fields:\n{journal}"
    );

    // systemctl reload re-reads the config (ExecReload sends SIGHUP; the daemon says RELOADING=1, then
    // READY=1): the same process, reloaded.
    let before = c.main_pid();
    let (ok, text) = c.try_sh("systemctl reload redstream");
    assert!(ok, "reload: {text}\n{}", c.journal());
    wait_for("the reload in the journal", Duration::from_secs(20), || {
        c.sh("journalctl -u redstream --no-pager")
            .contains("reloaded the config")
            .then_some(())
    });
    assert_eq!(c.main_pid(), before, "a reload keeps the process");

    // A SIGSTOPped daemon sends no watchdog pings: systemd kills it and starts it again.
    let restarts_before: u32 = c
        .sh("systemctl show -P NRestarts redstream")
        .trim()
        .parse()
        .unwrap();
    c.sh(&format!("kill -STOP {before}"));
    let after_watchdog = wait_for("a restart by the watchdog", Duration::from_secs(40), || {
        let pid = c.main_pid();
        (pid != 0 && pid != before && c.active()).then_some(pid)
    });
    let journal = c.sh("journalctl -u redstream --no-pager");
    assert!(journal.contains("Watchdog timeout"), "{journal}");

    // SIGKILL: Restart=on-failure brings it back.
    c.sh(&format!("kill -KILL {after_watchdog}"));
    wait_for("a restart after SIGKILL", Duration::from_secs(30), || {
        let pid = c.main_pid();
        (pid != 0 && pid != after_watchdog && c.active()).then_some(())
    });
    let restarts: u32 = c
        .sh("systemctl show -P NRestarts redstream")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        restarts - restarts_before,
        2,
        "two restarts counted by systemd"
    );

    // Still working after both.
    c.sh("redis-cli XADD nova:task:echo:requests '*' n 2");
    wait_for("the second echo reply", Duration::from_secs(20), || {
        let n = c.sh("redis-cli XLEN nova:task:echo:replies");
        (n.trim() == "2").then_some(())
    });
}
