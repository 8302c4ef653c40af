//! `task-router`: reads task snapshots (the boomerang MCP server's `nova:task:boomerang:tasks`) and emits
//! one event per snapshot on `nova:task:boomerang:events` (or the configured `events`):
//!
//! - `task_completed` when the task's status is done/completed/closed;
//! - `task_created` when it is the task's first revision (`revision` absent or 1);
//! - `task_updated` otherwise.
//!
//! A snapshot carries the task as JSON in its `task` field, with at least `id` and `status`. A snapshot
//! that is not valid JSON, or has no id, is rejected (dead-lettered) — it would never succeed.
//!
//! With a `state` namespace in its config, it keeps the last revision of each task (`revision:<id>`,
//! committed with the ack): a snapshot no newer than that — a late or repeated copy — emits nothing.
//!
//! With a `webhook` URL in its config (and that origin in its `allowed_outbound_hosts`), it POSTs
//! `{"type":"task_completed","task_id":…,"revision":…}` there for each completed task before its event
//! is committed; an answer other than 2xx, or none, retries the message (the webhook then sees the same
//! `Idempotency-Key` again and can drop the repeat).

use redstream_guest::http::Request;
use redstream_guest::state::{self, StateError};
use redstream_guest::{Guest, HandlerError, Message, Reply, export_handler};
use serde_json::Value;

struct TaskRouter;

impl Guest for TaskRouter {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let raw = msg.field("task").ok_or_else(|| HandlerError::Reject("no `task` field".into()))?;
        let task: Value = serde_json::from_slice(raw)
            .map_err(|e| HandlerError::Reject(format!("`task` is not JSON: {e}")))?;
        let id = match &task["id"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(HandlerError::Reject("the task has no id".into())),
        };
        let status = task["status"].as_str().unwrap_or("unknown");
        let revision = task["revision"].as_u64().unwrap_or(1);
        let key = format!("revision:{id}");
        match state::get_text(&key) {
            Ok(seen) => {
                if let Some(seen) = seen.and_then(|s| s.parse::<u64>().ok())
                    && revision <= seen
                {
                    redstream_guest::info(&format!("task {id}: revision {revision} is not newer than {seen}; no event"));
                    return Ok(());
                }
                state::set_text(&key, &revision.to_string(), None)?;
            }
            // Without state it emits an event for every snapshot.
            Err(StateError::NotConfigured(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let event = match status {
            "done" | "completed" | "closed" => "task_completed",
            _ if revision <= 1 => "task_created",
            _ => "task_updated",
        };
        if event == "task_completed"
            && let Some(url) = redstream_guest::config("webhook")
        {
            let body = serde_json::json!({"type": event, "task_id": id, "revision": revision});
            let res = Request::post(&url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()?;
            if !res.ok() {
                return Err(HandlerError::retry(format!("the webhook {url} answered {}", res.status)));
            }
        }
        let to = redstream_guest::config("events").unwrap_or_else(|| "nova:task:boomerang:events".into());
        Reply::new()
            .text("type", event)
            .text("task_id", &id)
            .text("status", status)
            .text("revision", &revision.to_string())
            .bytes("task", raw)
            .send(&to)
            .map_err(|e| HandlerError::Reject(format!("cannot publish to {to}: {e:?}")))
    }
}

export_handler!(TaskRouter);
