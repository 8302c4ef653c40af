//! Stream, group and consumer names.
//!
//! Owns the two accepted stream-name forms (docs/design.md, "Envelope and naming") and the domain a name belongs to, which is what
//! roles are granted on. It does not decide who may touch a stream: that is [`crate::auth`].
//!
//! - ADAPT: `nova:{domain}:{entity}:{function}`, domain from a configurable list, entity and function of
//!   `[A-Za-z0-9_-]+` — e.g. `nova:task:boomerang:tasks`. The entity may be written as a Redis Cluster
//!   hash tag, `nova:task:{boomerang}:tasks`: every stream of the entity then hashes to one slot (so a
//!   reply and its source can share one atomic commit); it is still entity `boomerang` for roles and
//!   route patterns.
//! - legacy: `{service}.{name}.direct` matching `^[a-z]+\.[a-z0-9]+\.direct$`; it counts as domain `task`.

use std::fmt;

/// The domains of the original RedStream, used when the config names none.
pub const DEFAULT_DOMAINS: [&str; 7] = [
    "system",
    "task",
    "agent",
    "user",
    "memory",
    "devops",
    "broadcast",
];

/// The domain legacy `*.direct` names count as.
pub const LEGACY_DOMAIN: &str = "task";

/// Validates stream names against the configured domain list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Naming {
    domains: Vec<String>,
}

/// The parts of a valid stream name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamName<'a> {
    /// `nova:{domain}:{entity}:{function}`
    Adapt {
        domain: &'a str,
        /// Without the braces of a hash tag.
        entity: &'a str,
        function: &'a str,
        /// Whether the entity was written `{entity}`.
        hash_tag: bool,
    },
    /// `{service}.{name}.direct`, domain `task`.
    Legacy { service: &'a str, name: &'a str },
}

impl StreamName<'_> {
    /// The domain whose roles govern this stream.
    pub fn domain(&self) -> &str {
        match self {
            StreamName::Adapt { domain, .. } => domain,
            StreamName::Legacy { .. } => LEGACY_DOMAIN,
        }
    }
}

/// A stream name that is neither ADAPT nor legacy; its message names the value and both accepted forms.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid stream name {name:?}: {reason}; expected nova:{{domain}}:{{entity}}:{{function}} \
     (domain one of {domains}, entity and function of [A-Za-z0-9_-]+, e.g. nova:task:boomerang:tasks) \
     or the legacy {{service}}.{{name}}.direct (e.g. devops.cline.direct)"
)]
pub struct InvalidStreamName {
    pub name: String,
    pub reason: &'static str,
    domains: String,
}

impl Naming {
    /// A validator accepting `domains`. Each domain must itself be a plain lowercase word
    /// (`[a-z0-9_-]+`), since it becomes part of role names like `{domain}_write`.
    pub fn new<I, S>(domains: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let domains: Vec<String> = domains.into_iter().map(Into::into).collect();
        if domains.is_empty() {
            return Err("expected at least one domain".into());
        }
        for d in &domains {
            let ok = !d.is_empty()
                && d.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !ok {
                return Err(format!("domain {d:?} is not of [a-z0-9_-]+"));
            }
        }
        Ok(Naming { domains })
    }

    /// The configured domains, in config order.
    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// Whether `domain` is one of the configured domains.
    pub fn is_domain(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d == domain)
    }

    /// Parses `name` into its parts, or says exactly why it is not a stream name we accept.
    pub fn parse<'a>(&self, name: &'a str) -> Result<StreamName<'a>, InvalidStreamName> {
        let fail = |reason| InvalidStreamName {
            name: name.to_owned(),
            reason,
            domains: self.domains.join("|"),
        };
        if let Some(rest) = name.strip_prefix("nova:") {
            let mut parts = rest.split(':');
            let (Some(domain), Some(entity), Some(function), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(fail("an ADAPT name has exactly four ':'-separated parts"));
            };
            if !self.is_domain(domain) {
                return Err(fail("unknown domain"));
            }
            let (entity, hash_tag) = match entity.strip_prefix('{') {
                Some(tagged) => match tagged.strip_suffix('}') {
                    Some(inner) => (inner, true),
                    None => return Err(fail("a hash-tagged entity is written {entity}")),
                },
                None => (entity, false),
            };
            if !is_segment(entity) || !is_segment(function) {
                return Err(fail(
                    "entity and function must be non-empty [A-Za-z0-9_-]+ (the entity may be a hash tag, {entity})",
                ));
            }
            return Ok(StreamName::Adapt {
                domain,
                entity,
                function,
                hash_tag,
            });
        }
        if let Some(rest) = name.strip_suffix(".direct") {
            if let Some((service, inner)) = rest.split_once('.') {
                let service_ok =
                    !service.is_empty() && service.bytes().all(|b| b.is_ascii_lowercase());
                let inner_ok = !inner.is_empty()
                    && inner
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
                if service_ok && inner_ok {
                    return Ok(StreamName::Legacy {
                        service,
                        name: inner,
                    });
                }
            }
            return Err(fail("a legacy name is [a-z]+.[a-z0-9]+.direct"));
        }
        Err(fail("it is neither an ADAPT nor a legacy name"))
    }

    /// The domain of `name`, validating it on the way.
    pub fn domain_of<'a>(&self, name: &'a str) -> Result<&'a str, InvalidStreamName> {
        Ok(match self.parse(name)? {
            StreamName::Adapt { domain, .. } => domain,
            StreamName::Legacy { .. } => LEGACY_DOMAIN,
        })
    }
}

impl Default for Naming {
    fn default() -> Self {
        Naming {
            domains: DEFAULT_DOMAINS.iter().map(|d| d.to_string()).collect(),
        }
    }
}

fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// What kind of name [`validate_name`] checked, for its error message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    Group,
    Consumer,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Group => "group",
            NameKind::Consumer => "consumer",
        })
    }
}

/// A group or consumer name that Redis would accept but operators could not read or type reliably.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: {reason}")]
pub struct InvalidName {
    pub kind: NameKind,
    pub name: String,
    pub reason: &'static str,
}

/// Longest group or consumer name we accept; Redis has no limit, but names show up in logs and metrics.
pub const MAX_NAME_LEN: usize = 200;

/// Checks a group or consumer name: non-empty, at most [`MAX_NAME_LEN`] bytes, no whitespace or control
/// characters.
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), InvalidName> {
    let fail = |reason| InvalidName {
        kind,
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(fail("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(fail("it is longer than 200 bytes"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail("it contains whitespace or control characters"));
    }
    Ok(())
}
