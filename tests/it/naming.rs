//! Stream, group and consumer names: the accept/reject tables, including the original's own examples.

use redstream::model::naming::{NameKind, Naming, StreamName, validate_name};

#[test]
fn accepts_adapt_and_legacy_names() {
    let naming = Naming::default();
    let cases = [
        ("nova:task:boomerang:tasks", "task"),
        ("nova:system:mcp:heartbeat", "system"),
        ("nova:system:mcp:control", "system"),
        ("nova:agent:Claude-3_opus:inbox", "agent"),
        ("nova:broadcast:all:events", "broadcast"),
        ("nova:devops:cline:direct", "devops"),
        ("devops.cline.direct", "task"),
        ("a.b2.direct", "task"),
    ];
    for (name, domain) in cases {
        let parsed = naming
            .parse(name)
            .unwrap_or_else(|e| panic!("{name} should be valid: {e}"));
        assert_eq!(parsed.domain(), domain, "{name}");
        assert_eq!(naming.domain_of(name).unwrap(), domain);
    }
    assert_eq!(
        naming.parse("nova:task:boomerang:tasks").unwrap(),
        StreamName::Adapt {
            domain: "task",
            entity: "boomerang",
            function: "tasks",
            hash_tag: false,
        }
    );
}

/// A Redis Cluster hash tag in the entity segment: still entity `boomerang`, domain `task`; malformed
/// tags are refused with the rule; the default dead-letter stream keeps the tag (same slot).
#[test]
fn hash_tagged_entities_are_the_same_entity() {
    let naming = Naming::default();
    assert_eq!(
        naming.parse("nova:task:{boomerang}:tasks").unwrap(),
        StreamName::Adapt {
            domain: "task",
            entity: "boomerang",
            function: "tasks",
            hash_tag: true,
        }
    );
    assert_eq!(
        naming.domain_of("nova:task:{boomerang}:tasks").unwrap(),
        "task"
    );
    for bad in [
        "nova:task:{}:tasks",
        "nova:task:{boomerang:tasks",
        "nova:task:boomerang}:tasks",
        "nova:task:{a}b:tasks",
        "nova:task:boomerang:{tasks}",
    ] {
        let e = naming.parse(bad).expect_err(bad);
        assert!(e.to_string().contains(bad), "{e}");
    }
    let s = crate::util::settings_from(&crate::util::daemon_toml(
        "redis://127.0.0.1:1",
        "[[consumers]]\nstream = \"nova:task:{boomerang}:tasks\"\ngroup = \"g\"\nhandler = \"drop\"\n",
    ))
    .expect("valid");
    assert_eq!(
        s.consumers[0].dead_letter,
        "nova:task:{boomerang}:tasks-dlq"
    );
}

#[test]
fn rejects_everything_else_naming_the_value_and_both_forms() {
    let naming = Naming::default();
    let cases = [
        // The original's documentation used these; they are not ADAPT names.
        "nova:devops:general",
        "nova:broadcast:all",
        "nova:unknown:x:y",
        "nova:task:boom erang:tasks",
        "nova:task::tasks",
        "nova:task:a:b:c",
        "nova:Task:a:b",
        "NOVA:task:a:b",
        "nova:task:a:tasks\n",
        "tasks",
        "",
        "Devops.cline.direct",
        "devops.cline.Direct",
        "devops.cl-ine.direct",
        "devops..direct",
        ".cline.direct",
        "devops.cline.x.direct",
        "devops.cline",
    ];
    for name in cases {
        let err = naming.parse(name).expect_err(name);
        let text = err.to_string();
        assert!(
            text.contains(&format!("{name:?}")),
            "error names the value: {text}"
        );
        assert!(text.contains("nova:{domain}:{entity}:{function}"), "{text}");
        assert!(text.contains("{service}.{name}.direct"), "{text}");
    }
}

#[test]
fn domain_list_is_configurable() {
    let naming = Naming::new(["task", "billing"]).unwrap();
    assert!(naming.parse("nova:billing:invoices:created").is_ok());
    let err = naming.parse("nova:agent:x:y").unwrap_err();
    assert!(err.to_string().contains("task|billing"), "{err}");
    assert!(Naming::new(["Bad Domain"]).is_err());
    assert!(Naming::new(Vec::<String>::new()).is_err());
}

#[test]
fn group_and_consumer_names() {
    for ok in ["workers", "redstream@host-1", "g:1", "ünïcode"] {
        validate_name(NameKind::Group, ok).unwrap();
        validate_name(NameKind::Consumer, ok).unwrap();
    }
    for bad in [
        "",
        "two words",
        "tab\there",
        "new\nline",
        "nul\0",
        "\u{7f}",
        &"x".repeat(201),
    ] {
        let err = validate_name(NameKind::Consumer, bad).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid consumer name"),
            "{err}"
        );
    }
}
