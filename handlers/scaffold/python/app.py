"""{{name}}: a RedStream handler. `redstream handler build` builds it, `redstream handler test` runs
cases.jsonl against it, handler.toml deploys it."""

import wit_world
import redstream


class WitWorld(wit_world.WitWorld):
    def handle(self, msg):
        # A missing field rejects the message (dead-lettered now: retrying will not add it).
        # Typed JSON: `task = redstream.json(msg, "task")`
        who = redstream.require_text(msg, "greet")
        to = redstream.config("reply_to")
        if to is None:
            raise redstream.reject("configure reply_to for this handler")
        # Buffered now, written with the ack if this returns; a refused publish rejects.
        redstream.Reply().text("greeting", f"hello, {who}").send(to)
        # Something temporarily wrong? `raise redstream.retry("why")`: tried again later.
