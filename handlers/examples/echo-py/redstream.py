"""Helpers for RedStream handlers in Python, built with componentize-py against
redstream:handler@0.1.2 (wit/handler.wit). `redstream handler new --lang python` copies this file.

What `handle` does decides what happens to the message: returning commits the replies it sent with
the ack; `raise retry(why)` leaves it pending for another try (up to the consumer's max_deliveries);
`raise reject(why)` dead-letters it now. Any other exception traps: a retry, with the traceback in
the handler's output.
"""

import json as _json

from componentize_py_types import Err
from wit_world.imports import host, types
from wit_world.imports import state as _state


def retry(why, after_ms=None):
    """Try again later: at the consumer's next retry step, or `after_ms` milliseconds from now when
    given. Raise it: `raise retry("database is down")`, `raise retry("rate limited", after_ms=30000)`."""
    if after_ms is not None:
        host.retry_after(max(0, int(after_ms)))
    return Err(types.HandlerError_Retry(str(why)))


def reject(why):
    """It will never work: dead-letter the message now. Raise it: `raise reject("no task field")`."""
    return Err(types.HandlerError_Reject(str(why)))


def field(msg, name):
    """The raw value (bytes) of the first field called `name`, or None."""
    for n, v in msg.fields:
        if n == name:
            return v
    return None


def text(msg, name):
    """The value of `name` as text, or None when absent or not UTF-8."""
    v = field(msg, name)
    if v is None:
        return None
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return None


def require_text(msg, name):
    """The value of `name` as text; rejects the message when it is absent or not UTF-8."""
    v = field(msg, name)
    if v is None:
        raise reject(f"no `{name}` field")
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        raise reject(f"field `{name}` is not UTF-8 text")


def json(msg, name):
    """The value of `name` parsed as JSON (publishers store objects and arrays as JSON text);
    rejects the message when it is absent or not JSON."""
    t = require_text(msg, name)
    try:
        return _json.loads(t)
    except ValueError as e:
        raise reject(f"field `{name}`: {e}")


def user_fields(msg):
    """Fields whose names do not start with `_` (the envelope's and routing's do), as (name, bytes)."""
    return [(n, v) for n, v in msg.fields if not n.startswith("_")]


def _state_call(f):
    try:
        return f()
    except Err as e:
        if isinstance(e.value, _state.StateError_Unavailable):
            raise retry(f"state unavailable: {e.value.value}")
        raise reject(f"state refused: {e.value.value}")


def state_get(key):
    """The value (bytes) of `key` in the handler's own state (the namespace its config names), or
    None. Sees the call's own earlier writes; a value that cannot be read retries the message."""
    return _state_call(lambda: _state.get(key))


def state_text(key):
    """The value of `key` as text, or None when absent or not UTF-8."""
    v = state_get(key)
    if v is None:
        return None
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError:
        return None


def state_set(key, value, ttl_ms=None):
    """Sets `key` to `value` (str or bytes) at commit, atomically with the ack and the replies; kept
    `ttl_ms` after the commit when given. A refused write rejects the message."""
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    _state_call(lambda: _state.set(key, data, None if ttl_ms is None else max(1, int(ttl_ms))))


def state_remove(key):
    """Removes `key` at commit."""
    _state_call(lambda: _state.remove(key))


def config(key):
    """A value of the handler's `config` table, or None."""
    return host.config(key)


def log(level, text):
    """A line in RedStream's log (at most 50 per message); level: debug, info, warn or error."""
    host.log(getattr(types.Level, level.upper()), str(text))


def _describe(e):
    kinds = {
        types.PublishError_InvalidStream: "invalid stream",
        types.PublishError_Denied: "denied",
        types.PublishError_TooLarge: "too large",
    }
    return f"{kinds.get(type(e), type(e).__name__)}: {e.value}"


class Reply:
    """A reply under construction; `send` buffers it, RedStream writes it with the ack."""

    def __init__(self):
        self.fields = []

    def text(self, name, value):
        self.fields.append((name, str(value).encode("utf-8")))
        return self

    def bytes(self, name, value):
        self.fields.append((name, bytes(value)))
        return self

    def json(self, name, value):
        return self.text(name, _json.dumps(value, separators=(",", ":")))

    def send(self, stream, after_ms=None, at_ms=None):
        """Buffers the reply for `stream`. A refused publish (wrong stream, missing role, too large)
        rejects the message, naming why; catch it to decide otherwise. With `after_ms` (milliseconds
        after the message's commit) or `at_ms` (milliseconds since the Unix epoch) the reply is
        delayed: held in Redis with the ack and moved to its stream at that time, once (at most a year
        ahead)."""
        try:
            if after_ms is not None:
                host.publish_delayed(stream, self.fields, types.Due_After(max(0, int(after_ms))))
            elif at_ms is not None:
                host.publish_delayed(stream, self.fields, types.Due_At(max(0, int(at_ms))))
            else:
                host.publish(stream, self.fields)
        except Err as e:
            raise reject(f"reply refused: {_describe(e.value)}")
