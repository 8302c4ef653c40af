//! Config-driven routing: which handler a message goes to.
//!
//! Owns the route table of one consumer: routes match on the stream (exactly, or an ADAPT pattern with
//! `*` segments such as `nova:task:*:tasks`) and on field predicates (equals, exists, absent); the first
//! match wins; its action is a handler, a forward, or a drop. A message no route matches is acked or
//! dead-lettered, as configured. Running the handler is the consumer loop's business.

use std::sync::Arc;

use crate::model::message::{Handler, Message};

/// A stream name or ADAPT pattern: `*` stands for one whole segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPattern(Vec<Option<String>>);

impl StreamPattern {
    /// `nova:task:*:tasks` → segments, `*` as a wildcard. Any other name matches exactly.
    pub fn new(pattern: &str) -> Self {
        StreamPattern(
            pattern
                .split(':')
                .map(|s| (s != "*").then(|| s.to_owned()))
                .collect(),
        )
    }

    /// Whether `stream` matches. A hash-tagged segment (`{boomerang}`) is the same segment as its
    /// plain form, on either side.
    pub fn matches(&self, stream: &str) -> bool {
        let mut parts = stream.split(':');
        for want in &self.0 {
            match (want, parts.next()) {
                (_, None) => return false,
                (None, Some(_)) => {}
                (Some(w), Some(p)) if untagged(w) == untagged(p) => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }

    /// Whether every stream `other` matches, this matches too.
    pub fn covers(&self, other: &StreamPattern) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(&other.0).all(|(a, b)| match (a, b) {
                (None, _) => true,
                (Some(a), Some(b)) => untagged(a) == untagged(b),
                (Some(_), None) => false,
            })
    }

    /// Whether some stream matches both (a consumer's stream is a plain name, so this is `matches`).
    pub fn is_wildcard(&self) -> bool {
        self.0.iter().any(Option::is_none)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Handler(name) => write!(f, "handler {name}"),
            Action::Forward(to) => write!(f, "forward to {to}"),
            Action::Drop => f.write_str("drop"),
        }
    }
}

impl std::fmt::Display for StreamPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<&str> = self.0.iter().map(|p| p.as_deref().unwrap_or("*")).collect();
        f.write_str(&parts.join(":"))
    }
}

/// A segment without the braces of a hash tag.
fn untagged(segment: &str) -> &str {
    segment
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(segment)
}

/// The field predicates of a route; all must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Predicates {
    pub equals: Vec<(String, Vec<u8>)>,
    pub exists: Vec<String>,
    pub absent: Vec<String>,
}

impl Predicates {
    /// Whether these hold for every message `other` holds for (so a route with these, placed before
    /// one with `other`, leaves it nothing to match).
    pub fn implied_by(&self, other: &Predicates) -> bool {
        self.equals.iter().all(|e| other.equals.contains(e))
            && self
                .exists
                .iter()
                .all(|f| other.exists.contains(f) || other.equals.iter().any(|(g, _)| g == f))
            && self.absent.iter().all(|f| other.absent.contains(f))
    }

    pub fn hold(&self, msg: &Message) -> bool {
        self.equals
            .iter()
            .all(|(f, v)| msg.fields.get(f) == Some(v.as_slice()))
            && self.exists.iter().all(|f| msg.fields.get(f).is_some())
            && self.absent.iter().all(|f| msg.fields.get(f).is_none())
    }
}

/// A route as configured: what it matches, and the name of what it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub stream: StreamPattern,
    pub when: Predicates,
    pub action: Action,
}

/// A route's action as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A `[[handlers]]` entry by name.
    Handler(String),
    /// Copy the message to this stream.
    Forward(String),
    /// Ack without handling.
    Drop,
}

/// Where a matched message goes.
#[derive(Clone)]
pub enum Target {
    /// Run this handler; `require_sender_token` demands a verified `_token`.
    Handler {
        handler: Arc<dyn Handler>,
        require_sender_token: bool,
    },
    /// Ack without handling.
    Drop,
}

/// One route, resolved.
#[derive(Clone)]
pub struct Route {
    pub stream: StreamPattern,
    pub when: Predicates,
    pub target: Target,
}

/// What to do with a message no route matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmatched {
    Ack,
    DeadLetter,
}

/// The routes that can match one consumer's stream, in config order.
#[derive(Clone)]
pub struct Router {
    routes: Vec<Route>,
    unmatched: Unmatched,
}

/// The router's decision for one message.
pub enum Selection<'a> {
    Run {
        handler: &'a Arc<dyn Handler>,
        require_sender_token: bool,
    },
    Drop,
    Unmatched(Unmatched),
}

impl Router {
    /// A router over the routes that can match `stream`.
    pub fn new(stream: &str, routes: &[Route], unmatched: Unmatched) -> Self {
        Router {
            routes: routes
                .iter()
                .filter(|r| r.stream.matches(stream))
                .cloned()
                .collect(),
            unmatched,
        }
    }

    /// A router sending everything to one handler.
    pub fn single(handler: Arc<dyn Handler>, require_sender_token: bool) -> Self {
        Router {
            routes: vec![Route {
                stream: StreamPattern::new("*"),
                when: Predicates::default(),
                target: Target::Handler {
                    handler,
                    require_sender_token,
                },
            }],
            unmatched: Unmatched::DeadLetter,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The first route whose predicates hold for `msg` (the stream was matched at construction).
    pub fn select(&self, msg: &Message) -> Selection<'_> {
        for r in &self.routes {
            if r.when.hold(msg) {
                return match &r.target {
                    Target::Handler {
                        handler,
                        require_sender_token,
                    } => Selection::Run {
                        handler,
                        require_sender_token: *require_sender_token,
                    },
                    Target::Drop => Selection::Drop,
                };
            }
        }
        Selection::Unmatched(self.unmatched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_segments() {
        let p = StreamPattern::new("nova:task:*:tasks");
        assert!(p.matches("nova:task:boomerang:tasks"));
        assert!(!p.matches("nova:task:boomerang:events"));
        assert!(!p.matches("nova:task:a:b:tasks"));
        assert!(!p.matches("nova:task:tasks"));
        assert!(StreamPattern::new("devops.cline.direct").matches("devops.cline.direct"));
        assert!(!StreamPattern::new("nova:task:a:b").matches("nova:task:a:bc"));
        // Hash tags: the same entity, written either way.
        assert!(p.matches("nova:task:{boomerang}:tasks"));
        assert!(
            StreamPattern::new("nova:task:boomerang:tasks").matches("nova:task:{boomerang}:tasks")
        );
        assert!(
            StreamPattern::new("nova:task:{boomerang}:tasks").matches("nova:task:boomerang:tasks")
        );
        assert!(
            !StreamPattern::new("nova:task:{boomerang}:tasks").matches("nova:task:{other}:tasks")
        );
        assert_eq!(p.to_string(), "nova:task:*:tasks");
    }

    #[test]
    fn coverage_of_patterns_and_predicates() {
        let any = StreamPattern::new("nova:task:*:tasks");
        let one = StreamPattern::new("nova:task:a:tasks");
        assert!(any.covers(&one) && any.covers(&any) && !one.covers(&any));
        assert!(!any.covers(&StreamPattern::new("nova:task:a:b:tasks")));
        let none = Predicates::default();
        let typed = Predicates {
            equals: vec![("type".into(), b"x".to_vec())],
            ..Predicates::default()
        };
        let has_type = Predicates {
            exists: vec!["type".into()],
            ..Predicates::default()
        };
        assert!(none.implied_by(&typed) && has_type.implied_by(&typed));
        assert!(!typed.implied_by(&none) && !typed.implied_by(&has_type));
    }
}
