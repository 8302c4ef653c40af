// Helpers for RedStream handlers in JavaScript, built against redstream:handler@0.1.2
// (wit/handler.wit) with either engine `redstream handler new --lang js` offers: QuickJS
// (componentize-qjs, the default: small and fast per call) or StarlingMonkey (componentize-js: `fetch`
// and `async` handlers, about ten times the cost per call). This file works under both; the project's
// package.json says which builds it. `redstream handler new --lang js` copies this file.
//
// What a handler returns decides what happens to the message: returning normally commits the replies
// it sent with the ack; `throw retry(why)` leaves it pending for another try (up to the consumer's
// max_deliveries); `throw reject(why)` dead-letters it now. Wrapped in `handler(...)`, any other
// exception becomes a retry naming it; unwrapped, it traps (also a retry, with the text on stderr).
import {
  publish,
  publishDelayed,
  log as hostLog,
  config as hostConfig,
  retryAfter as hostRetryAfter,
} from 'redstream:handler/host@0.1.2';
import {
  get as stateGet,
  set as stateSet,
  remove as stateRemove,
} from 'redstream:handler/state@0.1.2';

// StarlingMonkey has TextEncoder and TextDecoder; QuickJS has neither, but its URI functions convert
// UTF-8 natively, and decodeURIComponent refuses what is not UTF-8 (as a fatal TextDecoder does).
const encoder = typeof TextEncoder === 'function' ? new TextEncoder() : undefined;
const decoder =
  typeof TextDecoder === 'function' ? new TextDecoder('utf-8', { fatal: true }) : undefined;

/** `s` as UTF-8 bytes (a lone surrogate becomes U+FFFD, as TextEncoder makes it). */
function utf8(s) {
  if (encoder) return encoder.encode(s);
  let binary;
  try {
    binary = unescape(encodeURIComponent(s));
  } catch {
    binary = unescape(encodeURIComponent(s.toWellFormed()));
  }
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

/** UTF-8 `bytes` as a string; throws when they are not UTF-8. */
function fromUtf8(bytes) {
  if (decoder) return decoder.decode(bytes);
  let binary = '';
  // In slices: apply() takes its arguments on the stack.
  for (let i = 0; i < bytes.length; i += 8192) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
  }
  return /^[\x00-\x7f]*$/.test(binary) ? binary : decodeURIComponent(escape(binary));
}

// QuickJS has no console: its lines go to RedStream's log, as StarlingMonkey's go to its output.
if (typeof console === 'undefined') {
  const line = (level) => (...args) => hostLog(level, args.map(String).join(' '));
  globalThis.console = {
    log: line('info'),
    info: line('info'),
    debug: line('debug'),
    warn: line('warn'),
    error: line('error'),
  };
}

/** Try again later: at the consumer's next retry step, or `afterMs` milliseconds from now when given.
 * Throw it: `throw retry('database is down')`, `throw retry('rate limited', { afterMs: 30000 })`. */
export function retry(why, { afterMs } = {}) {
  if (afterMs !== undefined) hostRetryAfter(ms(afterMs));
  return { tag: 'retry', val: String(why) };
}

/** It will never work: dead-letter the message now. Throw it: `throw reject('no task field')`. */
export function reject(why) {
  return { tag: 'reject', val: String(why) };
}

// StarlingMonkey settles a call's promise before the call ends; QuickJS (built with --sync) returns
// at the first `await`, before the rest runs. Only StarlingMonkey has `fetch`.
const ASYNC_CALLS = typeof fetch === 'function';

/** `handle` with the error convention applied: other exceptions become retries naming them. `fn` may
 * be `async` (to `await fetch(...)`, for a handler granted `allowed_outbound_hosts`) under the
 * StarlingMonkey engine: the call then ends when its promise settles, and a rejection counts as a
 * throw. Under QuickJS an `async` handler is rejected, naming the engine it needs: its work after the
 * first `await` would never run. */
export function handler(fn) {
  const outcome = (e) => {
    if (e && (e.tag === 'retry' || e.tag === 'reject')) return e;
    return retry(e instanceof Error ? `${e.name}: ${e.message}` : String(e));
  };
  return (msg) => {
    let out;
    try {
      out = fn(msg);
    } catch (e) {
      throw outcome(e);
    }
    if (out && typeof out.then === 'function') {
      if (!ASYNC_CALLS) {
        throw reject(
          'handle returned a promise (an async handler): build it with the StarlingMonkey engine ' +
            '(componentize-js; `redstream handler new NAME --lang js --engine starlingmonkey`), ' +
            'QuickJS ends the call at its first await',
        );
      }
      return out.then(
        () => undefined,
        (e) => {
          throw outcome(e);
        },
      );
    }
  };
}

/** The raw value (Uint8Array) of the first field called `name`, or undefined. */
export function field(msg, name) {
  // Indexed, not `for (const [n, v] of …)`: QuickJS interprets the iterator protocol step by step.
  const fields = msg.fields;
  for (let i = 0; i < fields.length; i++) if (fields[i][0] === name) return fields[i][1];
  return undefined;
}

/** The value of `name` as text, or undefined when absent or not UTF-8. */
export function text(msg, name) {
  const v = field(msg, name);
  if (v === undefined) return undefined;
  try {
    return fromUtf8(v);
  } catch {
    return undefined;
  }
}

/** The value of `name` as text; rejects the message when it is absent or not UTF-8. */
export function requireText(msg, name) {
  const v = field(msg, name);
  if (v === undefined) throw reject(`no \`${name}\` field`);
  try {
    return fromUtf8(v);
  } catch {
    throw reject(`field \`${name}\` is not UTF-8 text`);
  }
}

/** The value of `name` parsed as JSON (publishers store objects and arrays as JSON text); rejects
 * the message when it is absent or not JSON. */
export function json(msg, name) {
  const t = requireText(msg, name);
  try {
    return JSON.parse(t);
  } catch (e) {
    throw reject(`field \`${name}\`: ${e.message}`);
  }
}

/** Fields whose names do not start with `_` (the envelope's and routing's do), as [name, bytes]. */
export function userFields(msg) {
  const fields = msg.fields;
  const out = [];
  for (let i = 0; i < fields.length; i++) if (fields[i][0][0] !== '_') out.push(fields[i]);
  return out;
}

function callState(f) {
  try {
    return f();
  } catch (e) {
    const p = e.payload ?? e;
    if (p && p.tag === 'unavailable') throw retry(`state unavailable: ${p.val}`);
    throw reject(`state refused: ${p && p.tag ? `${p.tag}: ${p.val}` : String(p)}`);
  }
}

/** The handler's own state, under the namespace its config names (`state` of its [[handlers]]
 * entry): `get` sees the call's own earlier writes; `set` and `remove` are committed with the replies,
 * atomically with the ack (a message that ran twice changes the state once). A value that cannot be
 * read retries the message; a refused write rejects it. */
export const state = {
  /** The value of `key` (a Uint8Array), or undefined. */
  get(key) {
    return callState(() => stateGet(key)) ?? undefined;
  },
  /** The value of `key` as text, or undefined when absent or not UTF-8. */
  text(key) {
    const v = this.get(key);
    if (v === undefined) return undefined;
    try {
      return fromUtf8(v);
    } catch {
      return undefined;
    }
  },
  /** Sets `key` to `value` (text or bytes) at commit, kept `ttlMs` after it when given. */
  set(key, value, { ttlMs } = {}) {
    const bytes = typeof value === 'string' ? utf8(value) : Uint8Array.from(value);
    callState(() => stateSet(key, bytes, ttlMs === undefined ? null : ms(ttlMs)));
  },
  /** Removes `key` at commit. */
  remove(key) {
    callState(() => stateRemove(key));
  },
};

/** A value of the handler's `config` table, or undefined. */
export function config(key) {
  return hostConfig(key) ?? undefined;
}

/** Lines in RedStream's log (at most 50 per message). */
export const log = {
  debug: (t) => hostLog('debug', String(t)),
  info: (t) => hostLog('info', String(t)),
  warn: (t) => hostLog('warn', String(t)),
  error: (t) => hostLog('error', String(t)),
};

function ms(n) {
  return Math.max(0, Math.round(Number(n)));
}

function describe(p) {
  const kinds = { 'invalid-stream': 'invalid stream', denied: 'denied', 'too-large': 'too large' };
  return p && p.tag ? `${kinds[p.tag] ?? p.tag}: ${p.val}` : String(p);
}

/** A reply under construction; `send` buffers it, RedStream writes it with the ack. */
export class Reply {
  constructor() {
    this.fields = [];
  }
  text(name, value) {
    this.fields.push([name, utf8(String(value))]);
    return this;
  }
  bytes(name, value) {
    this.fields.push([name, value instanceof Uint8Array ? value : Uint8Array.from(value)]);
    return this;
  }
  json(name, value) {
    return this.text(name, JSON.stringify(value));
  }
  /** Buffers the reply for `stream`. A refused publish (wrong stream, missing role, too large)
   * rejects the message, naming why; catch it to decide otherwise. With `afterMs` (milliseconds after
   * the message's commit) or `atMs` (milliseconds since the Unix epoch) the reply is delayed: held in
   * Redis with the ack and moved to its stream at that time, once (at most a year ahead). */
  send(stream, { afterMs, atMs } = {}) {
    try {
      if (afterMs !== undefined) {
        publishDelayed(stream, this.fields, { tag: 'after', val: ms(afterMs) });
      } else if (atMs !== undefined) {
        publishDelayed(stream, this.fields, { tag: 'at', val: ms(atMs) });
      } else {
        publish(stream, this.fields);
      }
    } catch (e) {
      const err = reject(`reply refused: ${describe(e.payload ?? e)}`);
      err.refusal = e.payload;
      throw err;
    }
  }
}
