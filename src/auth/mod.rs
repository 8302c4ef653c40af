//! Who may do what: roles, the operations they cover, and the identities that carry them.
//!
//! Owns the permission rule (docs/design.md, "Identity and roles") — `{domain}_read` covers read,
//! read-group, ack, claim, pending and info; `{domain}_write` covers publish, group creation and deleting
//! entries; `admin` covers everything — applied to one stream by [`authorize`], and the two ways an
//! identity is proven: JWTs ([`jwt`]) and hashed API keys ([`apikey`]). Calling [`authorize`] before each
//! Redis command is [`crate::client`]'s job; depends only on [`crate::model`].

pub mod apikey;
pub mod jwt;
pub mod signature;

use std::collections::BTreeSet;
use std::fmt;

use crate::model::naming::{InvalidStreamName, Naming};

/// One role as written in tokens and config.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `{domain}_read`
    Read(String),
    /// `{domain}_write`
    Write(String),
    /// `admin`: every operation on every stream.
    Admin,
}

impl Role {
    /// Parses `admin`, `{domain}_read` or `{domain}_write` (syntax only; see [`Role::check_domain`]).
    pub fn parse(s: &str) -> Result<Role, String> {
        if s == "admin" {
            return Ok(Role::Admin);
        }
        let (domain, make): (_, fn(String) -> Role) = if let Some(d) = s.strip_suffix("_read") {
            (d, Role::Read)
        } else if let Some(d) = s.strip_suffix("_write") {
            (d, Role::Write)
        } else {
            return Err(format!(
                "role {s:?} is not one of admin, {{domain}}_read, {{domain}}_write"
            ));
        };
        if domain.is_empty() {
            return Err(format!("role {s:?} names no domain"));
        }
        Ok(make(domain.to_owned()))
    }

    /// Config-time check that a role names a configured domain (a typo would otherwise grant nothing).
    pub fn check_domain(&self, naming: &Naming) -> Result<(), String> {
        match self {
            Role::Admin => Ok(()),
            Role::Read(d) | Role::Write(d) if naming.is_domain(d) => Ok(()),
            Role::Read(d) | Role::Write(d) => Err(format!(
                "role {self} names unknown domain {d:?} (domains: {})",
                naming.domains().join(", ")
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Read(d) => write!(f, "{d}_read"),
            Role::Write(d) => write!(f, "{d}_write"),
            Role::Admin => f.write_str("admin"),
        }
    }
}

/// Every stream operation the authorized client performs, each checked before it reaches Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Publish,
    Read,
    ReadGroup,
    Ack,
    Claim,
    Pending,
    CreateGroup,
    /// XINFO on a stream or its groups and consumers.
    Info,
    /// XDEL of entries (dead-letter replay removes what it replayed).
    Delete,
}

/// Which half of a domain's roles an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Op {
    pub const ALL: [Op; 9] = [
        Op::Publish,
        Op::Read,
        Op::ReadGroup,
        Op::Ack,
        Op::Claim,
        Op::Pending,
        Op::CreateGroup,
        Op::Info,
        Op::Delete,
    ];

    pub fn access(self) -> Access {
        match self {
            Op::Publish | Op::CreateGroup | Op::Delete => Access::Write,
            Op::Read | Op::ReadGroup | Op::Ack | Op::Claim | Op::Pending | Op::Info => Access::Read,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Publish => "publish",
            Op::Read => "read",
            Op::ReadGroup => "read-group",
            Op::Ack => "ack",
            Op::Claim => "claim",
            Op::Pending => "pending",
            Op::CreateGroup => "create-group",
            Op::Info => "info",
            Op::Delete => "delete",
        })
    }
}

/// A set of roles, indexed for the permission check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    roles: BTreeSet<Role>,
}

impl Roles {
    pub fn new(roles: impl IntoIterator<Item = Role>) -> Self {
        Roles {
            roles: roles.into_iter().collect(),
        }
    }

    /// Parses role strings, failing on the first that is not a role.
    pub fn parse<S: AsRef<str>>(roles: &[S]) -> Result<Self, String> {
        roles
            .iter()
            .map(|r| Role::parse(r.as_ref()))
            .collect::<Result<BTreeSet<_>, _>>()
            .map(|roles| Roles { roles })
    }

    pub fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    /// The permission rule, for a stream of `domain`.
    pub fn allows(&self, op: Op, domain: &str) -> bool {
        if self.is_admin() {
            return true;
        }
        // Building a Role to look up costs an allocation; the sets are tiny, so scan instead.
        self.roles.iter().any(|r| match (r, op.access()) {
            (Role::Read(d), Access::Read) | (Role::Write(d), Access::Write) => d == domain,
            _ => false,
        })
    }

    /// The role that would allow `op` on `domain`, for error messages.
    pub fn needed(op: Op, domain: &str) -> Role {
        match op.access() {
            Access::Read => Role::Read(domain.to_owned()),
            Access::Write => Role::Write(domain.to_owned()),
        }
    }

    /// Whether every role of `other` is granted here (admin grants everything).
    pub fn covers(&self, other: &Roles) -> bool {
        self.is_admin() || other.roles.is_subset(&self.roles)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Role> {
        self.roles.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }

    /// The roles as strings, for token claims and output.
    pub fn to_strings(&self) -> Vec<String> {
        self.roles.iter().map(Role::to_string).collect()
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.roles.is_empty() {
            return f.write_str("(no roles)");
        }
        for (i, r) in self.roles.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// A proven identity: who (becomes `_source` on publish) and what they may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub roles: Roles,
}

/// Why [`authorize`] refused an operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The stream name is not one RedStream accepts, so it has no domain to hold a role for.
    #[error(transparent)]
    InvalidStream(#[from] InvalidStreamName),
    /// The identity holds no role that covers the operation.
    #[error("{identity} may not {op} on {stream:?}: that needs role {needed} or admin")]
    Unauthorized {
        op: Op,
        stream: String,
        identity: String,
        needed: Role,
    },
}

/// The permission rule applied to one operation on one stream: a valid name, and a role for its domain.
pub fn authorize(naming: &Naming, identity: &Identity, op: Op, stream: &str) -> Result<(), Denied> {
    let domain = naming.domain_of(stream)?;
    if identity.roles.allows(op, domain) {
        Ok(())
    } else {
        Err(Denied::Unauthorized {
            op,
            stream: stream.to_owned(),
            identity: identity.subject.clone(),
            needed: Roles::needed(op, domain),
        })
    }
}
