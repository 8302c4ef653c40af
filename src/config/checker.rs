//! Collecting config problems: [`Checker`] reads values out of the raw config and records every problem
//! with its key path and where the value came from; [`ConfigError`] is what a broken config yields.
//!
//! Owns the reading rules shared by every section (durations, texts, secrets, roles); what each
//! section means is [`super::validate`]'s, [`super::consumers`]', [`super::handlers`]' and
//! [`super::system`]'s.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::value::Tag;
use figment::{Figment, Metadata, Source};

use super::raw::{Loose, RawSecret};
use super::secret;
use crate::auth::{Role, Roles};
use crate::model::naming::Naming;

/// One thing wrong with the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `auth.keys[1].algorithm`.
    pub path: String,
    pub message: String,
    /// Where the value came from, when known: the file, or the environment variable.
    pub origin: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        if let Some(o) = &self.origin {
            write!(f, " (from {o})")?;
        }
        Ok(())
    }
}

/// The config could not be used. Lists every problem found.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub problems: Vec<Problem>,
    /// The component files the config names, there or not: a refused reload is tried again when one
    /// of them appears or changes (`wasm.watch`).
    pub named: Vec<PathBuf>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "invalid configuration ({}):", p.display())?,
            None => write!(f, "invalid configuration:")?,
        }
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub(super) fn one(file: Option<PathBuf>, path: &str, message: String) -> Self {
        ConfigError {
            file,
            problems: vec![Problem {
                path: path.into(),
                message,
                origin: None,
            }],
            named: Vec::new(),
        }
    }
}

/// Collects problems while reading values out of the raw config.
pub struct Checker<'a> {
    figment: &'a Figment,
    /// Directory that relative secret and handler file paths are resolved against.
    pub base_dir: Option<&'a Path>,
    credentials_dir: Option<&'a Path>,
    pub problems: Vec<Problem>,
    /// What is allowed but almost certainly not meant (a route that can never match…): reported by
    /// `check` and logged at start and reload, never refused.
    pub warnings: Vec<Problem>,
    /// Component files named, there or not ([`ConfigError::named`]).
    pub named: Vec<PathBuf>,
    /// Where each table of an array came from (`consumers[2]` → its drop-in), for warnings about
    /// merged indexes.
    elements: Vec<(String, String)>,
    /// Names of `[[handlers]]` entries that are the faults test handler (fault-injection builds):
    /// routes and consumers may name them like WASM handlers.
    pub faults_handlers: Vec<String>,
}

impl<'a> Checker<'a> {
    pub fn new(
        figment: &'a Figment,
        base_dir: Option<&'a Path>,
        credentials_dir: Option<&'a Path>,
    ) -> Self {
        Checker {
            figment,
            base_dir,
            credentials_dir,
            problems: Vec::new(),
            warnings: Vec::new(),
            named: Vec::new(),
            elements: Vec::new(),
            faults_handlers: Vec::new(),
        }
    }

    /// Records a warning about `path`, naming the file its table came from when known (an index like
    /// `consumers[2]` is of the merged config: the drop-in that wrote it says which one).
    pub fn warn(&mut self, path: &str, message: impl Into<String>) {
        let origin = self
            .elements
            .iter()
            .find(|(element, _)| {
                path.strip_prefix(element.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
            })
            .map(|(_, origin)| origin.clone());
        self.warnings.push(Problem {
            path: path.to_owned(),
            message: message.into(),
            origin,
        });
    }

    /// Notes where the table `element` (e.g. `consumers[2]`) came from: the source of its value
    /// behind `tag`, when that is a file.
    pub fn note_element(&mut self, element: String, tag: Tag) {
        if let Some(meta) = self.figment.get_metadata(tag)
            && let Some(Source::File(file)) = &meta.source
        {
            self.elements.push((element, file.display().to_string()));
        }
    }

    /// The directory of the file the value behind `tag` came from (a drop-in or the main file).
    pub fn source_dir(&self, tag: Tag) -> Option<PathBuf> {
        match &self.figment.get_metadata(tag)?.source {
            Some(Source::File(p)) => p.parent().map(Path::to_path_buf),
            _ => None,
        }
    }

    /// Records a problem with a key that has no single origin (a missing key, a relation of keys).
    pub fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_owned(),
            message: message.into(),
            origin: None,
        });
    }

    /// Records a problem with the value behind `tag`, naming the file or variable it came from.
    fn problem_at(&mut self, path: &str, tag: Tag, message: String) {
        let origin = self.figment.get_metadata(tag).map(|m| origin_of(m, path));
        self.problems.push(Problem {
            path: path.to_owned(),
            message,
            origin,
        });
    }

    /// The value of a scalar, or a recorded problem.
    pub fn get<T: Clone>(&mut self, path: &str, v: &Loose<T>, expected: &str) -> Option<T> {
        match &v.value {
            Ok(t) => Some(t.clone()),
            Err(shown) => {
                self.problem_at(path, v.tag, format!("expected {expected}, found {shown}"));
                None
            }
        }
    }

    /// A string parsed by `parse`, whose error becomes the problem's message.
    pub fn parse<T>(
        &mut self,
        path: &str,
        v: &Loose<String>,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        self.parse_shown(path, v, expected, |s| format!("{s:?}"), parse)
    }

    /// [`Checker::parse`] for a value that may hold a secret: a wrong one is reported as `show` has it.
    pub fn parse_shown<T>(
        &mut self,
        path: &str,
        v: &Loose<String>,
        expected: &str,
        show: impl FnOnce(&str) -> String,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.get(path, v, expected)?;
        match parse(&s) {
            Ok(t) => Some(t),
            Err(msg) => {
                let shown = show(&s);
                self.problem_at(
                    path,
                    v.tag,
                    format!("expected {expected}, found {shown}: {msg}"),
                );
                None
            }
        }
    }

    /// A duration such as `"2s"`, `"500ms"`, `"1h 30m"`.
    pub fn duration(&mut self, path: &str, v: &Loose<String>) -> Option<Duration> {
        self.parse(path, v, "a duration like \"2s\" or \"500ms\"", |s| {
            humantime::parse_duration(s).map_err(|e| e.to_string())
        })
    }

    /// Like [`Checker::duration`] but zero is refused.
    /// A percentage from `min`% to 100% (`"20%"`); `example` goes into the message.
    pub fn percent(
        &mut self,
        path: &str,
        v: &Loose<String>,
        min: u32,
        example: &str,
    ) -> Option<u32> {
        let expected = format!("a percentage from {min}% to 100%, e.g. \"{example}\"");
        self.parse(path, v, &expected, |s| {
            s.strip_suffix('%')
                .and_then(|n| n.trim().parse::<u32>().ok())
                .filter(|n| (min..=100).contains(n))
                .ok_or_else(|| format!("not a percentage from {min}% to 100%"))
        })
    }

    pub fn positive_duration(&mut self, path: &str, v: &Loose<String>) -> Option<Duration> {
        let d = self.duration(path, v)?;
        if d.is_zero() {
            self.problem(path, "expected a duration above zero, found 0");
            return None;
        }
        Some(d)
    }

    /// A non-empty string.
    pub fn text(&mut self, path: &str, v: &Loose<String>) -> Option<String> {
        let s = self.get(path, v, "a string")?;
        if s.trim().is_empty() {
            self.problem_at(
                path,
                v.tag,
                "expected a non-empty string, found \"\"".into(),
            );
            return None;
        }
        Some(s)
    }

    /// A secret's bytes. Relative file paths are taken from the config file's directory.
    pub fn secret(&mut self, path: &str, s: &RawSecret) -> Option<Vec<u8>> {
        let rebased;
        let s = match (s, self.base_dir) {
            (RawSecret::From(from), Some(base))
                if from
                    .file
                    .as_deref()
                    .is_some_and(|f| Path::new(f).is_relative()) =>
            {
                let mut from = from.clone();
                from.file = from
                    .file
                    .map(|f| base.join(f).to_string_lossy().into_owned());
                rebased = RawSecret::From(from);
                &rebased
            }
            _ => s,
        };
        // Certificates and public keys are public; everything else given as a secret is private.
        let key = path.rsplit('.').next().unwrap_or(path);
        let privacy = match key {
            "tls_ca" | "tls_cert" | "public_key" => secret::Privacy::Public,
            _ => secret::Privacy::Private,
        };
        match secret::resolve(s, self.credentials_dir, privacy) {
            Ok(b) => Some(b),
            Err(msg) => {
                self.problem(path, msg);
                None
            }
        }
    }

    /// A secret that must be UTF-8 text (passwords, tokens).
    pub fn secret_text(&mut self, path: &str, s: &RawSecret) -> Option<String> {
        let bytes = self.secret(path, s)?;
        match String::from_utf8(bytes) {
            Ok(t) => Some(t),
            Err(_) => {
                self.problem(path, "the secret is not UTF-8 text");
                None
            }
        }
    }

    /// A list of roles; each must name a configured domain.
    pub fn roles(&mut self, path: &str, list: &[Loose<String>], naming: &Naming) -> Roles {
        let mut roles = Vec::new();
        for (i, r) in list.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let parsed = self.parse(
                &p,
                r,
                "a role (admin, {domain}_read or {domain}_write)",
                |s| {
                    let role = Role::parse(s)?;
                    role.check_domain(naming)?;
                    Ok(role)
                },
            );
            roles.extend(parsed);
        }
        Roles::new(roles)
    }
}

/// A duration as people write it (`1m 30s`), for messages.
pub(super) fn fmt_d(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// "config/redstream.toml" or "environment variable REDSTREAM_REDIS__URL".
pub(super) fn origin_of(meta: &Metadata, path: &str) -> String {
    match &meta.source {
        Some(Source::File(p)) => p.display().to_string(),
        _ if meta.name.contains("environment") => {
            let var: String = path
                .split('.')
                .map(|s| s.to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join("__");
            format!("environment variable REDSTREAM_{var}")
        }
        _ => meta.name.to_string(),
    }
}
