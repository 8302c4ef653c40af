// echo, in JavaScript: replies to the stream named in `_reply_to` — or, without one, to the
// configured `reply_to` — with the message's own fields and `in_reply_to` = its id. Gives the same
// replies and reasons as the Rust echo (handlers/examples/echo), checked by the parity test.
import { text, config, userFields, reject, retry, state, Reply } from './redstream.js';

export function handle(msg) {
  const after = text(msg, 'retry_after_ms');
  if (after !== undefined) {
    const ms = /^[0-9]+$/.test(after) ? Number(after) : NaN;
    if (!Number.isSafeInteger(ms)) throw reject(`retry_after_ms is not a number: ${after}`);
    throw retry(`asked to be retried in ${ms} ms`, { afterMs: ms });
  }
  const to = text(msg, '_reply_to') ?? config('reply_to');
  if (to === undefined) throw reject('no _reply_to field and no reply_to configured');
  const reply = new Reply().text('in_reply_to', msg.id);
  for (const [name, value] of userFields(msg)) reply.bytes(name, value);
  const countKey = text(msg, '_count');
  if (countKey !== undefined) {
    const before = state.text(countKey);
    const n = (before !== undefined && /^[0-9]+$/.test(before) ? Number(before) : 0) + 1;
    state.set(countKey, String(n));
    reply.text('count', String(n));
  }
  const delay = text(msg, '_delay_ms');
  let afterMs;
  if (delay !== undefined) {
    afterMs = /^[0-9]+$/.test(delay) ? Number(delay) : NaN;
    if (!Number.isSafeInteger(afterMs)) throw reject(`_delay_ms is not a number: ${delay}`);
  }
  try {
    reply.send(to, { afterMs });
  } catch (e) {
    throw reject(`cannot reply to ${to}: ${e.refusal ? e.refusal.val : e.val}`);
  }
}
