//! Integration tests, one binary. Each test that needs Redis starts its own redis-server on a free
//! loopback port (util/redis_server.rs) and kills it by pid when done.

mod util;

// Stream, group and consumer name tables.
mod naming;
// The wire envelope against Redis: round trips, binary values, the `id` field.
mod envelope;
// The authorized client: ranges, groups, pending, claims, blocking reads, listing.
mod client;
// JWTs: every acceptance and refusal, rotation.
mod jwt;
// Every operation × every role.
mod rbac;
// A Redis ACL user confined to its keys.
mod acl;
// Config validation: every problem at once, secrets, identities.
mod config;
// rediss:// and mutual TLS.
mod tls;
// The consumer loop in-process with a handler the test holds: claims, drains, ordering, in-flight.
mod consumer_loop;
// The daemon as a process: delivery, drains, crashes, Redis faults, poison, claims, ordering.
mod engine;
// The commit against hostile content and Redis trouble: wrong-type targets, wide entries, OOM.
mod commit;
// Dead letters: list and replay.
mod dlq;
// WASM handlers: sandbox, routing, sender tokens, reuse, check.
mod wasm;
// systemd notify: READY, STATUS, WATCHDOG, STOPPING, EXTEND_TIMEOUT.
mod notify;
// The systemd units: verify and security exposure.
mod systemd;
// Log destinations.
mod logging;
// The Prometheus endpoint.
mod metrics;
// Hot reload under traffic.
mod reload;
// Heartbeat and control streams.
mod control;
// Retention: trimming that spares lagging groups.
mod retention;
// The binary: exit codes, output, config layering, tokens.
mod cli;
// Handler authoring: drop-ins, scoped routes, check warnings, watch, handler new/build/test.
mod authoring;
// The Debian package, installed into a scratch root.
mod package;
// The .deb booted under a real systemd (systemd-nspawn).
mod boot;
// Per-handler breakers and rate limits.
mod breaker;
// Redis Cluster: failover, resharding, the outbox across slots, several daemons.
mod cluster;

// The shipped alert rules against a real Prometheus: time from fault to firing alert.
mod alerting;

// The nemesis: seeded random fault schedules, judged from what Redis holds.
mod nemesis;

// Parsers under arbitrary input.
mod props;

// Retries on a schedule.
mod retries;

// Delayed messages.
mod delayed;

// Handlers' state, committed with the ack.
mod state;
// Outbound HTTP from handlers: the allow-list, limits, idempotency keys, calls as tasks.
mod outbound;
