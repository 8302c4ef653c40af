//! The real `redstream run` as a child process: its config in a temp file, its log lines captured,
//! signals sent by pid (SIGTERM, SIGKILL), and its exit awaited with a deadline.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bin;

pub struct Daemon {
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    /// Reads stderr into `logs`; joined once the process has exited, so its last lines are in.
    reader: Option<std::thread::JoinHandle<()>>,
    _config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `redstream run` on `toml`, with `env` added to its environment.
    pub fn start(toml: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_wrapped(toml, env, &[])
    }

    /// Like [`Daemon::start`], run through `wrapper` (a command that ends by exec-ing its arguments,
    /// so the pid stays the daemon's), e.g. `unshare -m` to give it a private mount namespace.
    pub fn start_wrapped(toml: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("redstream.toml");
        std::fs::write(&config, toml).unwrap();
        if wrapper.first() == Some(&"setpriv") {
            // Run as another user: it must read its config.
            use std::os::unix::fs::PermissionsExt as _;
            let open = std::fs::Permissions::from_mode(0o755);
            std::fs::set_permissions(dir.path(), open).unwrap();
        }
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.arg("run").arg("--config").arg(&config);
        // The groups' positions file (daemon::positions) of this daemon alone, unless the test gives
        // one that survives a restart: another test's file must not say where its groups stood.
        cmd.env_remove("REDSTREAM_CONFIG")
            .env("RUST_LOG", "info,redstream=debug")
            .env("STATE_DIRECTORY", dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redstream run");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Daemon {
            child: Some(child),
            logs,
            reader: Some(reader),
            _config: config,
            _dir: dir,
        }
    }

    /// Starts it and waits until it says it is running (groups created, loops started).
    pub fn running(toml: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::running_wrapped(toml, env, &[])
    }

    /// [`Daemon::running`] through a wrapper, as [`Daemon::start_wrapped`]. A daemon that exits
    /// instead fails the test at once, with its log, rather than when the wait runs out.
    pub fn running_wrapped(toml: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        let mut d = Daemon::start_wrapped(toml, env, wrapper);
        let deadline = Instant::now() + Duration::from_secs(20);
        while d.count_log("redstream running") == 0 {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                d.child = None;
                // Its stderr has ended: every line it wrote is in the log now.
                if let Some(r) = d.reader.take() {
                    let _ = r.join();
                }
                panic!(
                    "daemon exited ({status}) before it was running:\n{}",
                    d.logs().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start:\n{}",
                d.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// The config file the daemon runs with (rewrite it, then SIGHUP, to reload).
    pub fn config_path(&self) -> PathBuf {
        self._config.clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.count_log(needle) > 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// SIGKILL: no drain, no cleanup — a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; its code, or None if it did not exit in time.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                // The process is gone, so its stderr ends: every line it wrote is in the log now.
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, then the exit code (panics if it does not exit within `limit`).
    pub fn stop(&mut self, limit: Duration) -> i32 {
        self.signal(libc::SIGTERM);
        match self.wait_exit(limit) {
            Some(code) => code,
            None => panic!(
                "daemon did not exit within {limit:?}:\n{}",
                self.logs().join("\n")
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- redstream log (pid gone) ----\n{}\n----",
                self.logs().join("\n")
            );
        }
    }
}
