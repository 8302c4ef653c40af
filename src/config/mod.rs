//! Configuration: where it is read from, and the validated [`Settings`] the rest of RedStream runs on.
//!
//! Layers, later wins: built-in defaults ([`raw`]) → TOML file (`--config PATH`, else `$REDSTREAM_CONFIG`,
//! else `/etc/redstream/redstream.toml`) → drop-ins (`redstream.d/*.toml` beside that file, in lexical
//! order: scalars override, arrays — `[[handlers]]`, `[[consumers]]`, roles — are appended) →
//! `REDSTREAM_*` environment variables, `__` separating nesting levels
//! (`REDSTREAM_REDIS__COMMAND_TIMEOUT=5s`). Deserialized, then built ([`validate`]): the runtime
//! never sees raw config, and a broken config yields one [`ConfigError`] listing every problem with its
//! key path — which the CLI turns into exit code 78.

//!
//! - [`raw`]: the deserialized shapes, with defaults in one place.
//! - `checker`: reading values and collecting problems and warnings; `lint`: the warnings about a valid
//!   config (shadowed routes, handlers run twice, config streams outside a handler's roles); `validate`, `consumers`, `handlers`, `system`:
//!   one file per group of sections; `secret`: inline, file, credential and env secrets.
//! - [`settings`]: the validated types config owns.

mod checker;
mod consumers;
#[cfg(feature = "fault-injection")]
mod faults;
mod handlers;
mod limits;
mod lint;
pub mod raw;
mod retry;
mod secret;
pub mod settings;
mod system;
mod validate;

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};

use checker::origin_of;

pub use checker::{ConfigError, Problem};
pub use consumers::default_consumer;
pub use handlers::parse_size;
pub use settings::{
    AuthSettings, ControlSettings, DaemonIdentity, DaemonSettings, HeartbeatSettings, Retention,
    Settings,
};
pub use validate::default_name;

/// Where the config file is looked for when neither `--config` nor `$REDSTREAM_CONFIG` names one.
pub const DEFAULT_PATH: &str = "/etc/redstream/redstream.toml";

/// Environment variables read by the CLI itself, not config keys.
const NOT_CONFIG_KEYS: [&str; 3] = ["config", "token", "api_key"];

/// Which file to read: `--config`, else `$REDSTREAM_CONFIG`, else [`DEFAULT_PATH`] if it exists.
/// A file named explicitly must exist.
pub fn locate(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    let named = explicit.map(|p| (p.to_path_buf(), "--config")).or_else(|| {
        std::env::var_os("REDSTREAM_CONFIG").map(|p| (PathBuf::from(p), "REDSTREAM_CONFIG"))
    });
    match named {
        Some((path, _)) if path.is_file() => Ok(Some(path)),
        Some((path, how)) => Err(ConfigError::one(
            Some(path.clone()),
            "(config file)",
            format!(
                "{} (named by {how}) does not exist or is not a file",
                path.display()
            ),
        )),
        None if Path::new(DEFAULT_PATH).is_file() => Ok(Some(PathBuf::from(DEFAULT_PATH))),
        None => Ok(None),
    }
}

/// Reads and validates the config, as described at the top of this module.
pub fn load(explicit: Option<&Path>) -> Result<Settings, ConfigError> {
    let file = locate(explicit)?;
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let mut figment = Figment::new();
    let mut dropins = Vec::new();
    if let Some(path) = &file {
        figment = figment.merge(Toml::file_exact(path));
        dropins = dropins_of(path)
            .map_err(|m| ConfigError::one(Some(path.clone()), "(drop-in directory)", m))?;
        for d in &dropins {
            figment = figment.admerge(Toml::file_exact(d));
        }
    }
    figment = figment.merge(
        Env::prefixed("REDSTREAM_")
            .split("__")
            .ignore(&NOT_CONFIG_KEYS),
    );
    let mut settings = from_figment(&figment, file, credentials.as_deref())?;
    settings.dropins = dropins;
    Ok(settings)
}

/// The drop-in directory of a config file: `redstream.d` beside `redstream.toml`.
pub fn dropin_dir(file: &Path) -> PathBuf {
    let stem = file.file_stem().unwrap_or_default().to_string_lossy();
    file.with_file_name(format!("{stem}.d"))
}

/// The `*.toml` files of `file`'s drop-in directory in lexical order (none when it does not exist).
pub fn dropins_of(file: &Path) -> Result<Vec<PathBuf>, String> {
    let dir = dropin_dir(file);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .path();
        // Editors' and package managers' leftovers (x.toml~, .x.toml.swp, x.toml.dpkg-old) end otherwise.
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Validates the config held by `figment`. `file` is the config file it read (relative secret paths
/// resolve against its directory); `credentials_dir` stands for `$CREDENTIALS_DIRECTORY`.
pub fn from_figment(
    figment: &Figment,
    file: Option<PathBuf>,
    credentials_dir: Option<&Path>,
) -> Result<Settings, ConfigError> {
    let raw: raw::RawConfig = figment.extract().map_err(|e| ConfigError {
        file: file.clone(),
        problems: e.into_iter().map(|e| figment_problem(&e)).collect(),
        named: Vec::new(),
    })?;
    let base_dir = file
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let mut checker = checker::Checker::new(figment, base_dir.as_deref(), credentials_dir);
    let built = validate::settings(&raw, &mut checker);
    if let Some(file) = &file {
        inline_secrets_readable_by_others(&raw, figment, file, &mut checker);
    }
    let problems = std::mem::take(&mut checker.problems);
    match built {
        Some(mut settings) if problems.is_empty() => {
            settings.file = file;
            settings.warnings = std::mem::take(&mut checker.warnings);
            Ok(settings)
        }
        _ => Err(ConfigError {
            file,
            problems,
            named: checker.named,
        }),
    }
}

/// Warns about every secret written inline in `file` when the file is readable by group or others:
/// whoever can read the config then holds the secret. (Inline values from the environment, and files
/// only their owner reads, are fine.)
fn inline_secrets_readable_by_others(
    raw: &raw::RawConfig,
    figment: &Figment,
    file: &Path,
    c: &mut checker::Checker<'_>,
) {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(mode) = std::fs::metadata(file).map(|m| m.permissions().mode() & 0o777) else {
        return;
    };
    if mode & 0o044 == 0 {
        return;
    }
    let mut inline: Vec<String> = Vec::new();
    let mut note = |path: String, secret: Option<&raw::RawSecret>| {
        if matches!(secret, Some(raw::RawSecret::Inline(_))) {
            inline.push(path);
        }
    };
    note("identity.token".into(), raw.identity.token.as_ref());
    note("redis.password".into(), raw.redis.password.as_ref());
    note("redis.tls_key".into(), raw.redis.tls_key.as_ref());
    for (i, k) in raw.auth.keys.iter().enumerate() {
        note(format!("auth.keys[{i}].secret"), k.secret.as_ref());
        note(
            format!("auth.keys[{i}].private_key"),
            k.private_key.as_ref(),
        );
    }
    for path in inline {
        let from_file = figment
            // An array comes whole from one source: its metadata is the array's.
            .find_metadata(path.split('[').next().unwrap_or(&path))
            .and_then(|m| m.source.as_ref())
            .and_then(|s| s.file_path())
            .is_some_and(|p| p == file);
        if from_file {
            c.warn(
                &path,
                format!(
                    "a secret written inline in {} (mode {mode:04o}), which other users can read: \
                     use {{ file = \"/path\" }} (mode 0600) or {{ credential = \"name\" }}, or make the \
                     config file 0600",
                    file.display()
                ),
            );
        }
    }
}

/// A structural error from figment (unknown key, a table where a value belongs…) as a problem.
fn figment_problem(e: &figment::Error) -> Problem {
    let path = key_path(&e.path);
    let message = match &e.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            format!(
                "unknown key {field:?}; expected one of {}",
                expected.join(", ")
            )
        }
        kind => kind.to_string(),
    };
    Problem {
        origin: e.metadata.as_ref().map(|m| origin_of(m, &path)),
        path: if path.is_empty() {
            "(top level)".into()
        } else {
            path
        },
        message,
    }
}

/// `["auth", "keys", "1", "id"]` → `auth.keys[1].id`.
fn key_path(segments: &[String]) -> String {
    let mut out = String::new();
    for s in segments {
        if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
            out.push_str(&format!("[{s}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_show_indices() {
        let segs: Vec<String> = ["auth", "keys", "1", "id"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(key_path(&segs), "auth.keys[1].id");
    }
}
