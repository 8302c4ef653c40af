"""echo, in Python: replies to the stream named in `_reply_to` — or, without one, to the configured
`reply_to` — with the message's own fields and `in_reply_to` = its id. Gives the same replies and
reasons as the Rust echo (handlers/examples/echo), checked by the parity test."""

from componentize_py_types import Err
from wit_world.imports import host, types

import wit_world
import redstream


class WitWorld(wit_world.WitWorld):
    def handle(self, msg):
        after = redstream.text(msg, "retry_after_ms")
        if after is not None:
            if not after.isascii() or not after.isdigit():
                raise redstream.reject(f"retry_after_ms is not a number: {after}")
            raise redstream.retry(f"asked to be retried in {int(after)} ms", after_ms=int(after))
        to = redstream.text(msg, "_reply_to")
        if to is None:
            to = redstream.config("reply_to")
        if to is None:
            raise redstream.reject("no _reply_to field and no reply_to configured")
        fields = [("in_reply_to", msg.id.encode())] + redstream.user_fields(msg)
        count_key = redstream.text(msg, "_count")
        if count_key is not None:
            before = redstream.state_text(count_key)
            n = (int(before) if before and before.isascii() and before.isdigit() else 0) + 1
            redstream.state_set(count_key, str(n))
            fields.append(("count", str(n).encode()))
        delay = redstream.text(msg, "_delay_ms")
        if delay is not None and (not delay.isascii() or not delay.isdigit()):
            raise redstream.reject(f"_delay_ms is not a number: {delay}")
        try:
            if delay is None:
                host.publish(to, fields)
            else:
                host.publish_delayed(to, fields, types.Due_After(int(delay)))
        except Err as e:
            raise redstream.reject(f"cannot reply to {to}: {e.value.value}")
