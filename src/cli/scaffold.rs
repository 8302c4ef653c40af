//! `redstream handler new` and `redstream handler build`: handler projects in Rust, JavaScript and
//! Python, from templates compiled into the binary (`handlers/scaffold`, the SDKs and the WIT).
//!
//! A project carries everything it needs to build away from this repository: the WIT contract, the
//! SDK of this release (the Rust crate vendored as a path dependency pinned to its version; the JS and
//! Python helper modules), a pinned toolchain (componentize-qjs or componentize-js in package.json,
//! componentize-py in requirements.txt), and `redstream-handler.toml`, which tells `build` and `test`
//! its language and where its component goes.
//!
//! JavaScript has two engines. QuickJS (componentize-qjs, the default) lifts a message in compiled
//! code and starts small: about 50 µs a reused call and 200 µs a fresh one on the echo handler.
//! StarlingMonkey (componentize-js) brings `fetch` and runs `async` handlers to the end, at about ten
//! times that (docs/performance.md, "Handlers in each language"). The SDK works under both.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Deserialize;

use super::{Exit, Failure};

type Result<T = ()> = std::result::Result<T, Failure>;

/// `redstream-handler.toml`, the manifest of a project made by `handler new`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    pub name: String,
    pub lang: String,
    /// The built component, relative to the project directory.
    pub component: PathBuf,
}

pub const MANIFEST: &str = "redstream-handler.toml";

impl Project {
    /// The project in `dir`, or why `dir` is not one.
    pub fn open(dir: &Path) -> Result<Project> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Failure::new(
                Exit::Failure,
                format!(
                    "{} is not a handler project ({}: {e}); make one with `redstream handler new NAME --lang rust|js|python`",
                    dir.display(),
                    path.display()
                ),
            )
        })?;
        let project: Project = Figment::from(Toml::string(&text))
            .extract()
            .map_err(|e| Failure::new(Exit::Config, format!("{}: {e}", path.display())))?;
        if !["rust", "js", "python"].contains(&project.lang.as_str()) {
            return Err(Failure::new(
                Exit::Config,
                format!(
                    "{}: lang {:?} is not rust, js or python",
                    path.display(),
                    project.lang
                ),
            ));
        }
        Ok(project)
    }
}

const WIT: &str = include_str!("../../handlers/wit/handler.wit");

/// (path in the project, template) of every file a project of `lang` (and JavaScript `engine`)
/// starts with.
fn files(lang: &str, engine: Engine) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![
        (
            "redstream-handler.toml",
            include_str!("../../handlers/scaffold/common/redstream-handler.toml"),
        ),
        (
            "handler.toml",
            include_str!("../../handlers/scaffold/common/handler.toml"),
        ),
        (
            "cases.jsonl",
            include_str!("../../handlers/scaffold/common/cases.jsonl"),
        ),
        (
            "README.md",
            include_str!("../../handlers/scaffold/common/README.md"),
        ),
        (
            ".gitignore",
            include_str!("../../handlers/scaffold/common/gitignore"),
        ),
        ("wit/handler.wit", WIT),
    ];
    out.extend(match lang {
        "rust" => vec![
            (
                "Cargo.toml",
                include_str!("../../handlers/scaffold/rust/Cargo.toml"),
            ),
            // The versions the SDK is tested with (handlers/Cargo.lock): a new project builds with them.
            (
                "Cargo.lock",
                include_str!("../../handlers/scaffold/rust/Cargo.lock"),
            ),
            (
                ".cargo/config.toml",
                include_str!("../../handlers/scaffold/rust/.cargo/config.toml"),
            ),
            (
                "src/lib.rs",
                include_str!("../../handlers/scaffold/rust/src/lib.rs"),
            ),
            (
                "sdk/Cargo.toml",
                include_str!("../../handlers/sdk/Cargo.toml"),
            ),
            (
                "sdk/src/lib.rs",
                include_str!("../../handlers/sdk/src/lib.rs"),
            ),
            (
                "sdk/src/http.rs",
                include_str!("../../handlers/sdk/src/http.rs"),
            ),
            ("sdk/wit/handler.wit", WIT),
        ],
        "js" => vec![
            (
                "package.json",
                match engine {
                    Engine::QuickJs => include_str!("../../handlers/scaffold/js/package.json"),
                    Engine::StarlingMonkey => {
                        include_str!("../../handlers/scaffold/js/package-starlingmonkey.json")
                    }
                },
            ),
            (
                "src/handler.js",
                include_str!("../../handlers/scaffold/js/src/handler.js"),
            ),
            (
                "src/redstream.js",
                include_str!("../../handlers/sdk-js/redstream.js"),
            ),
        ],
        _ => vec![
            (
                "requirements.txt",
                include_str!("../../handlers/scaffold/python/requirements.txt"),
            ),
            (
                "app.py",
                include_str!("../../handlers/scaffold/python/app.py"),
            ),
            (
                "redstream.py",
                include_str!("../../handlers/sdk-python/redstream.py"),
            ),
        ],
    });
    out
}

/// What the README and handler.toml say per language.
struct Words {
    language: &'static str,
    needs: &'static str,
    edit: &'static str,
    retry: &'static str,
    reject: &'static str,
    instance: &'static str,
}

/// The engine a JavaScript project builds with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    QuickJs,
    StarlingMonkey,
}

fn words(lang: &str, engine: Engine) -> Words {
    match lang {
        "rust" => Words {
            language: "Rust",
            needs: "Rust with the wasm32-wasip2 target (`rustup target add wasm32-wasip2`)",
            edit: "`src/lib.rs`; the SDK's helpers (`msg.require_text`, `msg.json::<T>`, `Reply`) are documented in `sdk/src/lib.rs`",
            retry: "returns `Err(HandlerError::retry(why))`",
            reject: "returns `Err(HandlerError::reject(why))`, or `?` on a missing field or a refused reply",
            instance: "fresh",
        },
        "js" if engine == Engine::StarlingMonkey => Words {
            language: "JavaScript (StarlingMonkey)",
            needs: "Node.js 18 or newer with npm; the first build installs the pinned componentize-js into node_modules (about 30 s)",
            edit: "`src/handler.js` (`fetch` works in an `async` handle, for the origins an `allowed_outbound_hosts` list in handler.toml grants); the helpers (`requireText`, `json`, `Reply`, `retry`, `reject`) are documented in `src/redstream.js`",
            retry: "throws `retry(why)` (or any other exception, inside `handler(...)`)",
            reject: "throws `reject(why)`, or a helper does (a missing field, a refused reply)",
            instance: "reuse",
        },
        "js" => Words {
            language: "JavaScript (QuickJS)",
            needs: "Node.js 18 or newer with npm; the first build installs the pinned componentize-qjs into node_modules",
            edit: "`src/handler.js` (QuickJS has no `fetch` and ends a call at its first `await`: for those, make the project with `--engine starlingmonkey`); the helpers (`requireText`, `json`, `Reply`, `retry`, `reject`) are documented in `src/redstream.js`",
            retry: "throws `retry(why)` (or any other exception, inside `handler(...)`)",
            reject: "throws `reject(why)`, or a helper does (a missing field, a refused reply)",
            instance: "reuse",
        },
        _ => Words {
            language: "Python",
            needs: "Python 3.10 or newer with venv; the first build installs the pinned componentize-py into .venv",
            edit: "`app.py`; the helpers (`require_text`, `json`, `Reply`, `retry`, `reject`) are documented in `redstream.py`",
            retry: "raises `redstream.retry(why)`",
            reject: "raises `redstream.reject(why)`, or a helper does (a missing field, a refused reply)",
            instance: "reuse",
        },
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.len() <= 64
        && !name.ends_with('-')
}

/// `redstream handler new NAME --lang LANG [--engine ENGINE] [--dir PATH]`.
pub fn new(name: &str, lang: &str, engine: Option<&str>, dir: Option<&Path>) -> Result {
    let engine = match (lang, engine) {
        ("js", None | Some("quickjs")) => Engine::QuickJs,
        ("js", Some(_)) => Engine::StarlingMonkey,
        (_, None) => Engine::QuickJs,
        (_, Some(e)) => {
            return Err(Failure::new(
                Exit::Failure,
                format!("--engine {e} is for --lang js; a {lang} handler has one toolchain"),
            ));
        }
    };
    if !valid_name(name) {
        return Err(Failure::new(
            Exit::Failure,
            format!(
                "{name:?} is not a handler name: lowercase letters, digits and -, starting with a letter (e.g. priority-escalator)"
            ),
        ));
    }
    let root = dir.unwrap_or(Path::new(".")).join(name);
    if root
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some())
    {
        return Err(Failure::new(
            Exit::Failure,
            format!(
                "{} exists and is not empty; choose another name or --dir",
                root.display()
            ),
        ));
    }
    let w = words(lang, engine);
    let crate_name = name.replace('-', "_");
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{lang}}", lang)
            .replace("{{language}}", w.language)
            .replace("{{needs}}", w.needs)
            .replace("{{edit}}", w.edit)
            .replace("{{retry}}", w.retry)
            .replace("{{reject}}", w.reject)
            .replace("{{instance}}", w.instance)
    };
    let mut written = Vec::new();
    for (rel, template) in files(lang, engine) {
        let path = root.join(rel);
        let fail = |e: std::io::Error| {
            Failure::new(
                Exit::Failure,
                format!("cannot write {}: {e}", path.display()),
            )
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(fail)?;
        }
        std::fs::write(&path, fill(template)).map_err(fail)?;
        written.push(rel);
    }
    println!(
        "created {} ({}): {}",
        root.display(),
        w.language,
        written.join(", ")
    );
    println!("next:");
    println!(
        "  redstream handler build {}    # needs {}",
        root.display(),
        w.needs
    );
    println!(
        "  redstream handler test {}     # runs cases.jsonl",
        root.display()
    );
    println!(
        "  then deploy it with {} (see its README.md)",
        root.join("handler.toml").display()
    );
    Ok(())
}

/// Runs a toolchain step in `dir`; its output goes to stderr, so stdout keeps only the result.
fn step(dir: &Path, program: &Path, args: &[&str], missing: &str) -> Result {
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| {
            Failure::new(
                Exit::Failure,
                format!("cannot run {}: {e}; {missing}", program.display()),
            )
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::new(
            Exit::Failure,
            format!(
                "`{} {}` failed ({status}) in {}; its output is above",
                program.display(),
                args.join(" "),
                dir.display()
            ),
        ))
    }
}

/// The project's own source files with extension `ext` (in `dir` and `dir/src`, not in dependencies).
fn sources(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = [dir.to_path_buf(), dir.join("src")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == ext))
        .collect();
    found.sort();
    found
}

/// Checks each source's syntax with `program args… FILE` before a toolchain that reports errors
/// without a place sees it: the first failure is the build's error, as the checker tells it (file,
/// line, the line itself, the message), without the checker's own stack.
fn syntax(dir: &Path, program: &Path, args: &[&str], files: &[PathBuf]) -> Result {
    for file in files {
        let shown = file.strip_prefix(dir).unwrap_or(file);
        let Ok(out) = Command::new(program)
            .args(args)
            .arg(shown)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
        else {
            return Ok(()); // no checker here: the toolchain reports what it can
        };
        if out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stderr);
        let told: Vec<&str> = text
            .lines()
            .take_while(|l| !l.trim_start().starts_with("at ") && !l.starts_with("Node.js v"))
            .filter(|l| !l.trim().is_empty())
            .collect();
        return Err(Failure::new(
            Exit::Failure,
            format!("{}: syntax error:\n{}", shown.display(), told.join("\n")),
        ));
    }
    Ok(())
}

/// Compiles the file named by its argument without writing bytecode, printing only where a syntax
/// error is.
const PY_SYNTAX: &str = "import sys, traceback
try: compile(open(sys.argv[1]).read(), sys.argv[1], 'exec')
except SyntaxError as e: sys.stderr.write(''.join(traceback.format_exception_only(type(e), e))); sys.exit(1)";

/// Whether `program --version` runs.
fn present(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `redstream handler build [PATH]`.
pub fn build(shown: &Path) -> Result {
    let project = Project::open(shown)?;
    // Toolchains run in the project directory; their paths must not depend on ours.
    let dir = &std::path::absolute(shown)
        .map_err(|e| Failure::new(Exit::Failure, format!("{}: {e}", shown.display())))?;
    let out = dir.join(&project.component);
    let started = Instant::now();
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            Failure::new(
                Exit::Failure,
                format!("cannot create {}: {e}", parent.display()),
            )
        })?;
    }
    match project.lang.as_str() {
        "rust" => build_rust(dir, &project, &out)?,
        "js" => build_js(dir)?,
        _ => build_python(dir, &out)?,
    }
    let size = std::fs::metadata(&out).map(|m| m.len()).map_err(|e| {
        Failure::new(
            Exit::Failure,
            format!(
                "the build finished but {} is not there ({e}): check the build command's output path",
                out.display()
            ),
        )
    })?;
    let shown_size = if size < 1 << 20 {
        format!("{:.1} KiB", size as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", size as f64 / f64::from(1 << 20))
    };
    println!(
        "built {} ({shown_size}) in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    println!("try it: redstream handler test {}", shown.display());
    Ok(())
}

fn build_rust(dir: &Path, project: &Project, out: &Path) -> Result {
    const RUST: &str =
        "install Rust with rustup (https://rustup.rs), then `rustup target add wasm32-wasip2`";
    if !present("cargo") {
        return Err(Failure::new(
            Exit::Failure,
            format!("cargo is not installed: {RUST}"),
        ));
    }
    if present("rustup") {
        let installed = Command::new("rustup")
            .args(["target", "list", "--installed"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if !installed.lines().any(|l| l.trim() == "wasm32-wasip2") {
            return Err(Failure::new(
                Exit::Failure,
                "the wasm32-wasip2 target is not installed: run `rustup target add wasm32-wasip2`",
            ));
        }
    }
    // From the project directory, so its .cargo/config.toml (target, stack size) applies.
    step(
        dir,
        Path::new("cargo"),
        &["build", "--release", "--target", "wasm32-wasip2"],
        RUST,
    )?;
    let built = dir
        .join("target/wasm32-wasip2/release")
        .join(format!("{}.wasm", project.name.replace('-', "_")));
    std::fs::copy(&built, out).map_err(|e| {
        Failure::new(
            Exit::Failure,
            format!("cannot copy {} to {}: {e}", built.display(), out.display()),
        )
    })?;
    Ok(())
}

fn build_js(dir: &Path) -> Result {
    const NODE: &str = "install Node.js 18 or newer with npm (Debian: apt-get install nodejs npm)";
    if !present("npm") {
        return Err(Failure::new(
            Exit::Failure,
            format!("npm is not installed: {NODE}"),
        ));
    }
    // The project's package.json names its engine's toolchain.
    let manifest = std::fs::read_to_string(dir.join("package.json")).unwrap_or_default();
    let tool = if manifest.contains("\"componentize-qjs\"") {
        "componentize-qjs"
    } else {
        "componentize-js"
    };
    if !dir.join("node_modules/.bin").join(tool).exists() {
        eprintln!("redstream: installing the pinned {tool} into node_modules (once)");
        step(
            dir,
            Path::new("npm"),
            &["install", "--no-audit", "--no-fund"],
            NODE,
        )?;
    }
    // The toolchains name no file or line for a syntax error; node does.
    syntax(dir, Path::new("node"), &["--check"], &sources(dir, "js"))?;
    step(dir, Path::new("npm"), &["run", "--silent", "build"], NODE)
}

fn build_python(dir: &Path, out: &Path) -> Result {
    const PYTHON: &str =
        "install Python 3.10 or newer with venv (Debian: apt-get install python3 python3-venv)";
    let venv = dir.join(".venv");
    let tool: PathBuf = venv.join("bin/componentize-py");
    if !tool.exists() {
        if !present("python3") {
            return Err(Failure::new(
                Exit::Failure,
                format!("python3 is not installed: {PYTHON}"),
            ));
        }
        eprintln!("redstream: installing the pinned componentize-py into .venv (once)");
        step(dir, Path::new("python3"), &["-m", "venv", ".venv"], PYTHON)?;
        step(
            dir,
            &venv.join("bin/pip"),
            &["install", "--quiet", "-r", "requirements.txt"],
            PYTHON,
        )?;
    }
    // componentize-py buries a syntax error in its own backtrace; Python's compiler says where.
    syntax(
        dir,
        &venv.join("bin/python"),
        &["-c", PY_SYNTAX],
        &sources(dir, "py"),
    )?;
    let out = out.strip_prefix(dir).unwrap_or(out).to_string_lossy();
    step(
        dir,
        &tool,
        &[
            "-d",
            "wit",
            "-w",
            "handler",
            "componentize",
            "app",
            "-o",
            &out,
        ],
        PYTHON,
    )
}
