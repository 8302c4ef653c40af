// {{name}}: a RedStream handler. `redstream handler build` builds it, `redstream handler test` runs
// cases.jsonl against it, handler.toml deploys it.
import { handler, requireText, config, reject, Reply } from './redstream.js';

export const handle = handler((msg) => {
  // A missing field rejects the message (dead-lettered now: retrying will not add it).
  // Typed JSON: `const task = json(msg, 'task');`
  const who = requireText(msg, 'greet');
  const to = config('reply_to');
  if (to === undefined) throw reject('configure reply_to for this handler');
  // Buffered now, written with the ack if this returns; a refused publish rejects.
  new Reply().text('greeting', `hello, ${who}`).send(to);
  // Something temporarily wrong? `throw retry('why')`: tried again later.
});
