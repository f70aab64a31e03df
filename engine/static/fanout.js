// fanout.js: the browser client of fanout's wire protocol v1 (docs/protocol.md).
// An ES module with no dependencies and no build step:
//
//   import { FanoutClient } from "/static/fanout.js";
//   const client = new FanoutClient("ws://127.0.0.1:8000/ws");
//   client.addEventListener("change", (e) => console.log(e.detail.topic, e.detail.items));
//   client.connect();
//   await client.subscribe(["prices.fx"]);
//   client.topic("prices.fx").get("EURUSD");   // the latest value
//
// The same rules as the Python client (engine/client/state.py):
// - a per-topic view (a Map) applying `snap` (full: true replaces, full: false
//   merges) and `upd`; a nil value deletes a key;
// - reconnect with exponential backoff and full jitter, reset after a connection
//   stayed up `stableMs`; a `bye` sets the next delay to its `retry_ms`; after
//   close 4001/4003 no reconnect until `setToken()`;
// - resubscribe with `since` (epoch and last position per topic) so that only
//   the keys missed while away are sent;
// - the token goes in the first message (`auth`): browsers cannot set headers;
// - with a `tokenProvider` (a function returning a token or a Promise of one),
//   the token stays fresh on the live connection: the provider is called before
//   the current token's `exp` (read from the JWT without verifying it; at
//   max(minMarginMs, marginFraction * lifetime) before it, never before half
//   the lifetime) and the new token is sent in `auth`, no reconnect. A provider
//   that rejects, throws, takes over `timeoutMs` or gives an unusable token (not
//   a string, already expired) is reported ("error", code "token_provider") and
//   called again after a backoff delay; the connection is kept (the server
//   closes 4003 at expiry; the client then waits for the provider and
//   reconnects). The rules are engine/client/tokens.py's;
// - sends respect `bufferedAmount`: over `maxBufferedBytes`, messages wait in a
//   bounded outbox (overflow: the message is refused, `send` returns false and
//   `counters.sendRefused` counts it).
// - a value it cannot decode (not UTF-8, nested deeper than MAX_DATA_DEPTH)
//   is kept as an `Undecodable` and reported ("error", code "bad_value"): the
//   connection stays up (no close 1002, no reconnect loop).
// Events (EventTarget): "state" {state}, "change" {topic, kind, pos, full,
// epoch, items: {key: value|null}, events, from, to}, "error" {code, msg,
// topic, key, error}, "bye" {reason, retry_ms}.

// -- msgpack ----------------------------------------------------------------------

/**
 * How deep the arrays and maps of one `data` value may nest (a scalar is depth
 * 0, `[1]` and `{}` depth 1): the engine refuses deeper values on every ingest
 * path, and this client decodes at least that (docs/protocol.md section 1; the
 * same constant as engine/protocol/codec.py MAX_DATA_DEPTH).
 */
export const MAX_DATA_DEPTH = 32;
/** Containers of a server message around a value: the message, `items`, a stream event's [pos, data]. */
export const ENVELOPE_DEPTH = 3;
/** The nesting decodeAll accepts by default: a whole server message. */
export const CLIENT_MAX_DEPTH = MAX_DATA_DEPTH + ENVELOPE_DEPTH;

const utf8Decoder = new TextDecoder("utf-8", { fatal: true }); // not UTF-8: an error, never U+FFFD
const utf8Encoder = new TextEncoder();

/** An ext value this decoder does not interpret: `type` and raw `data`. */
export class Ext {
  constructor(type, data) {
    this.type = type;
    this.data = data;
  }
}

/**
 * Stands for a value this client could not decode (a string that is not
 * UTF-8, nesting deeper than MAX_DATA_DEPTH): `reason` says why. The client
 * keeps it as the key's value, reports an "error" event with code
 * "bad_value", and keeps the connection (docs/clients.md).
 */
export class Undecodable {
  constructor(reason) {
    this.reason = reason;
  }
}

const TRUNCATED = "msgpack: truncated input";

/** A reader over one buffer; every decode below is built on it. */
function reader(bytes) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const r = { buf, at: 0 };
  const need = (n) => {
    if (r.at + n > buf.length) throw new RangeError(TRUNCATED);
  };
  const u8 = () => { need(1); return buf[r.at++]; };
  const u16 = () => { need(2); const v = view.getUint16(r.at); r.at += 2; return v; };
  const u32 = () => { need(4); const v = view.getUint32(r.at); r.at += 4; return v; };
  const big = (v) => (v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(v) : v);
  const str = (n) => { need(n); const s = utf8Decoder.decode(buf.subarray(r.at, r.at + n)); r.at += n; return s; };
  const bin = (n) => { need(n); const b = buf.slice(r.at, r.at + n); r.at += n; return b; };
  const tooDeep = (d, max) => {
    if (d > max) throw new RangeError(`msgpack: nested deeper than ${max} levels of arrays and maps`);
  };
  const arr = (n, d, max) => {
    tooDeep(d, max);
    const out = new Array(n);
    for (let i = 0; i < n; i++) out[i] = value(d, max);
    return out;
  };
  const map = (n, d, max) => {
    tooDeep(d, max);
    const out = {};
    for (let i = 0; i < n; i++) {
      const k = value(d, max);
      setOwn(out, k, value(d, max));
    }
    return out;
  };
  const ext = (n) => { need(1); const type = view.getInt8(r.at); r.at += 1; return new Ext(type, bin(n)); };
  /** The value at the cursor; `depth` containers enclose it, at most `max` may nest. */
  function value(depth, max) {
    const b = u8();
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if (b >= 0xa0 && b <= 0xbf) return str(b & 0x1f);
    if (b >= 0x90 && b <= 0x9f) return arr(b & 0x0f, depth + 1, max);
    if (b >= 0x80 && b <= 0x8f) return map(b & 0x0f, depth + 1, max);
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bin(u8());
      case 0xc5: return bin(u16());
      case 0xc6: return bin(u32());
      case 0xc7: return ext(u8());
      case 0xc8: return ext(u16());
      case 0xc9: return ext(u32());
      case 0xca: { need(4); const v = view.getFloat32(r.at); r.at += 4; return v; }
      case 0xcb: { need(8); const v = view.getFloat64(r.at); r.at += 8; return v; }
      case 0xcc: return u8();
      case 0xcd: return u16();
      case 0xce: return u32();
      case 0xcf: { need(8); const v = view.getBigUint64(r.at); r.at += 8; return big(v); }
      case 0xd0: { need(1); const v = view.getInt8(r.at); r.at += 1; return v; }
      case 0xd1: { need(2); const v = view.getInt16(r.at); r.at += 2; return v; }
      case 0xd2: { need(4); const v = view.getInt32(r.at); r.at += 4; return v; }
      case 0xd3: { need(8); const v = view.getBigInt64(r.at); r.at += 8; return big(v); }
      case 0xd4: return ext(1);
      case 0xd5: return ext(2);
      case 0xd6: return ext(4);
      case 0xd7: return ext(8);
      case 0xd8: return ext(16);
      case 0xd9: return str(u8());
      case 0xda: return str(u16());
      case 0xdb: return str(u32());
      case 0xdc: return arr(u16(), depth + 1, max);
      case 0xdd: return arr(u32(), depth + 1, max);
      case 0xde: return map(u16(), depth + 1, max);
      case 0xdf: return map(u32(), depth + 1, max);
      default: throw new RangeError(`msgpack: unknown type byte 0x${b.toString(16)}`);
    }
  }
  /** ["map" | "array", count] of the container at the cursor (consumed), or null (nothing consumed). */
  function head() {
    need(1);
    const b = buf[r.at];
    if (b >= 0x80 && b <= 0x8f) { r.at += 1; return ["map", b & 0x0f]; }
    if (b >= 0x90 && b <= 0x9f) { r.at += 1; return ["array", b & 0x0f]; }
    if (b === 0xdc || b === 0xde) { r.at += 1; return [b === 0xdc ? "array" : "map", u16()]; }
    if (b === 0xdd || b === 0xdf) { r.at += 1; return [b === 0xdd ? "array" : "map", u32()]; }
    return null;
  }
  /** Move past the value at the cursor without decoding it: iterative, any depth. */
  function skip() {
    let pending = 1;
    while (pending > 0) {
      const b = u8();
      pending -= 1;
      if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) continue;
      if (b >= 0x80 && b <= 0x8f) pending += 2 * (b & 0x0f);
      else if (b >= 0x90 && b <= 0x9f) pending += b & 0x0f;
      else if (b >= 0xa0 && b <= 0xbf) { need(b & 0x1f); r.at += b & 0x1f; }
      else {
        const fixed = { 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8, 0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17 }[b];
        if (fixed !== undefined) { need(fixed); r.at += fixed; continue; }
        switch (b) {
          case 0xc4: case 0xd9: { const n = u8(); need(n); r.at += n; break; }
          case 0xc5: case 0xda: { const n = u16(); need(n); r.at += n; break; }
          case 0xc6: case 0xdb: { const n = u32(); need(n); r.at += n; break; }
          case 0xc7: { const n = u8() + 1; need(n); r.at += n; break; }
          case 0xc8: { const n = u16() + 1; need(n); r.at += n; break; }
          case 0xc9: { const n = u32() + 1; need(n); r.at += n; break; }
          case 0xdc: pending += u16(); break;
          case 0xdd: pending += u32(); break;
          case 0xde: pending += 2 * u16(); break;
          case 0xdf: pending += 2 * u32(); break;
          default: throw new RangeError(`msgpack: unknown type byte 0x${b.toString(16)}`);
        }
      }
    }
  }
  /** A `data` value, or an Undecodable saying why it cannot be decoded (its bytes are skipped). */
  function guarded() {
    const start = r.at;
    try {
      return value(0, MAX_DATA_DEPTH);
    } catch (err) {
      if (err instanceof RangeError && err.message === TRUNCATED) throw err;
      r.at = start;
      skip(); // a frame that cannot be skipped is broken: that throws
      const reason = err instanceof TypeError ? "a string that is not valid UTF-8" : String(err.message || err);
      return new Undecodable(reason);
    }
  }
  r.value = value;
  r.head = head;
  r.guarded = guarded;
  return r;
}

// Object keys are set as own data properties: a key named __proto__ is plain data.
function setOwn(obj, k, v) {
  Object.defineProperty(obj, String(k), { value: v, enumerable: true, writable: true, configurable: true });
}

/**
 * Decode every msgpack value in `bytes` (a frame may hold several messages
 * back to back). Throws RangeError when the input ends inside a value, and
 * TypeError for a string that is not UTF-8. Integers beyond 2^53 become
 * BigInt; bin becomes Uint8Array; map keys become strings (as object keys);
 * arrays and maps nested more than `maxDepth` deep throw.
 */
export function decodeAll(bytes, { maxDepth = CLIENT_MAX_DEPTH } = {}) {
  const r = reader(bytes);
  const out = [];
  while (r.at < r.buf.length) out.push(r.value(0, maxDepth));
  return out;
}

/**
 * Decode a server frame: every message in it (docs/protocol.md section 1).
 * A value in `items` (a key's value, a stream event's data) that this client
 * cannot decode (not UTF-8, nested deeper than MAX_DATA_DEPTH) becomes an
 * Undecodable; the rest of the frame is decoded as usual. Throws only when the
 * frame itself is broken (truncated, an unknown type byte, a message that is
 * not a map).
 */
export function decodeFrame(bytes) {
  const r = reader(bytes);
  const out = [];
  while (r.at < r.buf.length) {
    const h = r.head();
    if (!h || h[0] !== "map") throw new RangeError("msgpack: a server message must be a map");
    const msg = {};
    for (let i = 0; i < h[1]; i++) {
      const k = r.value(1, CLIENT_MAX_DEPTH);
      setOwn(msg, k, k === "items" ? items(r) : r.value(1, CLIENT_MAX_DEPTH));
    }
    out.push(msg);
  }
  return out;
}

function items(r) {
  const h = r.head();
  if (h && h[0] === "map") { // a state topic's {key: data}
    const out = {};
    for (let i = 0; i < h[1]; i++) {
      const k = r.value(2, CLIENT_MAX_DEPTH);
      setOwn(out, k, r.guarded());
    }
    return out;
  }
  if (h && h[0] === "array") { // a stream topic's [[pos, data], ...]
    const out = new Array(h[1]);
    for (let i = 0; i < h[1]; i++) {
      const start = r.at;
      const e = r.head();
      if (e && e[0] === "array" && e[1] === 2) {
        out[i] = [r.value(3, CLIENT_MAX_DEPTH), r.guarded()];
      } else {
        r.at = start;
        out[i] = r.guarded();
      }
    }
    return out;
  }
  return r.value(1, CLIENT_MAX_DEPTH);
}

/** Decode exactly one msgpack value. */
export function decode(bytes) {
  const all = decodeAll(bytes);
  if (all.length !== 1) throw new RangeError(`msgpack: expected one value, found ${all.length}`);
  return all[0];
}

/**
 * Encode a value as msgpack: null/undefined -> nil, booleans, numbers (integers
 * in the smallest int form, others as float64), BigInt (64-bit), strings,
 * Uint8Array/ArrayBuffer (bin), arrays, Map and plain objects (maps).
 */
export function encode(value) {
  const chunks = [];
  let size = 0;
  const push = (arr) => { chunks.push(arr); size += arr.length; };
  const bytes = (...b) => push(Uint8Array.from(b));
  const withView = (n, fill) => { const a = new Uint8Array(n); fill(new DataView(a.buffer)); push(a); };
  const head = (n, fix, fixMax, c8, c16, c32) => {
    if (fix !== null && n <= fixMax) bytes(fix | n);
    else if (c8 !== null && n < 0x100) bytes(c8, n);
    else if (n < 0x10000) withView(3, (v) => { v.setUint8(0, c16); v.setUint16(1, n); });
    else withView(5, (v) => { v.setUint8(0, c32); v.setUint32(1, n); });
  };
  const int = (n) => {
    if (n >= 0) {
      if (n < 0x80) bytes(n);
      else if (n < 0x100) bytes(0xcc, n);
      else if (n < 0x10000) withView(3, (v) => { v.setUint8(0, 0xcd); v.setUint16(1, n); });
      else if (n < 0x100000000) withView(5, (v) => { v.setUint8(0, 0xce); v.setUint32(1, n); });
      else withView(9, (v) => { v.setUint8(0, 0xcf); v.setBigUint64(1, BigInt(n)); });
    } else {
      if (n >= -32) bytes(n + 0x100);
      else if (n >= -0x80) withView(2, (v) => { v.setUint8(0, 0xd0); v.setInt8(1, n); });
      else if (n >= -0x8000) withView(3, (v) => { v.setUint8(0, 0xd1); v.setInt16(1, n); });
      else if (n >= -0x80000000) withView(5, (v) => { v.setUint8(0, 0xd2); v.setInt32(1, n); });
      else withView(9, (v) => { v.setUint8(0, 0xd3); v.setBigInt64(1, BigInt(n)); });
    }
  };
  const container = (depth) => {
    if (depth >= CLIENT_MAX_DEPTH) throw new RangeError(`msgpack: nested deeper than ${CLIENT_MAX_DEPTH} levels of arrays and maps`);
  };
  function put(v, depth) {
    if (v === null || v === undefined) bytes(0xc0);
    else if (v === false) bytes(0xc2);
    else if (v === true) bytes(0xc3);
    else if (typeof v === "number") {
      if (Number.isInteger(v) && Number.isSafeInteger(v)) int(v);
      else withView(9, (dv) => { dv.setUint8(0, 0xcb); dv.setFloat64(1, v); });
    } else if (typeof v === "bigint") {
      if (v >= 0n) withView(9, (dv) => { dv.setUint8(0, 0xcf); dv.setBigUint64(1, v); });
      else withView(9, (dv) => { dv.setUint8(0, 0xd3); dv.setBigInt64(1, v); });
    } else if (typeof v === "string") {
      const s = utf8Encoder.encode(v);
      head(s.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
      push(s);
    } else if (v instanceof Uint8Array || v instanceof ArrayBuffer) {
      const b = v instanceof Uint8Array ? v : new Uint8Array(v);
      head(b.length, null, 0, 0xc4, 0xc5, 0xc6);
      push(b);
    } else if (Array.isArray(v)) {
      container(depth);
      head(v.length, 0x90, 15, null, 0xdc, 0xdd);
      for (const x of v) put(x, depth + 1);
    } else if (v instanceof Map) {
      container(depth);
      head(v.size, 0x80, 15, null, 0xde, 0xdf);
      for (const [k, x] of v) { put(k, depth + 1); put(x, depth + 1); }
    } else if (typeof v === "object") {
      container(depth);
      const keys = Object.keys(v).filter((k) => v[k] !== undefined);
      head(keys.length, 0x80, 15, null, 0xde, 0xdf);
      for (const k of keys) { put(k, depth + 1); put(v[k], depth + 1); }
    } else {
      throw new TypeError(`msgpack: cannot encode a ${typeof v}`);
    }
  }
  put(value, 0);
  const out = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  return out;
}

// -- the state view (pure) ----------------------------------------------------------

const own = (obj) => Object.keys(obj);

/** Every topic's view, fed with decoded server messages (rules of engine/client/state.py). */
export class StateView {
  constructor() {
    /** @type {Map<string, {items: Map<string, any>, epoch: string|null, pos: string|null}>} */
    this.topics = new Map();
  }

  view(topic) {
    let tv = this.topics.get(topic);
    if (!tv) {
      tv = { items: new Map(), epoch: null, pos: null };
      this.topics.set(topic, tv);
    }
    return tv;
  }

  forget(topic) {
    this.topics.delete(topic);
  }

  /** topic -> [epoch, pos] for every topic with a mark (restricted to `topics`). */
  since(topics) {
    const out = {};
    for (const [name, tv] of this.topics) {
      if (topics && !topics.includes(name)) continue;
      if (tv.epoch !== null && tv.pos !== null) out[name] = [tv.epoch, tv.pos];
    }
    return out;
  }

  /** Apply one message; returns the change it made, or null (hello, ack, ...). */
  apply(msg) {
    const op = msg && msg.op;
    if (op === "snap") return this._snap(msg);
    if (op === "upd") return this._upd(msg);
    if (op === "evt") {
      const tv = this.view(str(msg, "topic"));
      const events = msg.items;
      if (!Array.isArray(events)) throw new TypeError("evt: 'items' must be a list");
      if (events.length) tv.pos = events[events.length - 1][0];
      return { topic: msg.topic, kind: "evt", pos: tv.pos, full: false, items: {}, events };
    }
    if (op === "gap") {
      return { topic: str(msg, "topic"), kind: "gap", pos: str(msg, "to"), full: false, items: {}, from: msg.from, to: msg.to };
    }
    return null;
  }

  _snap(msg) {
    const topic = str(msg, "topic");
    const epoch = str(msg, "epoch");
    const pos = str(msg, "pos");
    if (typeof msg.full !== "boolean") throw new TypeError("snap: 'full' must be a boolean");
    const tv = this.view(topic);
    if (Array.isArray(msg.items)) {
      tv.epoch = epoch;
      tv.pos = msg.items.length ? msg.items[msg.items.length - 1][0] : pos;
      return { topic, kind: "snap", pos: tv.pos, full: msg.full, epoch, items: {}, events: msg.items };
    }
    const items = msg.items;
    if (!items || typeof items !== "object") throw new TypeError("snap: 'items' must be a map");
    let full = msg.full;
    const changed = {};
    if (full || tv.epoch !== epoch) {
      for (const k of tv.items.keys()) {
        if (!(k in items) || items[k] === null) changed[k] = null;
      }
      tv.items = new Map();
      full = true;
    }
    for (const k of own(items)) {
      const v = items[k];
      if (v === null) tv.items.delete(k);
      else tv.items.set(k, v);
      changed[k] = v;
    }
    tv.epoch = epoch;
    tv.pos = pos;
    return { topic, kind: "snap", pos, full, epoch, items: changed };
  }

  _upd(msg) {
    const topic = str(msg, "topic");
    const pos = str(msg, "pos");
    const items = msg.items;
    if (!items || typeof items !== "object") throw new TypeError("upd: 'items' must be a map");
    const tv = this.view(topic);
    for (const k of own(items)) {
      const v = items[k];
      if (v === null) tv.items.delete(k);
      else tv.items.set(k, v);
    }
    tv.pos = pos;
    return { topic, kind: "upd", pos, full: false, items };
  }
}

/** [key (or a stream event's position), Undecodable] of every value of `change` this client could not decode. */
export function undecodableIn(change) {
  const out = [];
  for (const k of own(change.items)) {
    if (change.items[k] instanceof Undecodable) out.push([k, change.items[k]]);
  }
  for (const e of change.events ?? []) {
    if (Array.isArray(e) && e[1] instanceof Undecodable) out.push([e[0], e[1]]);
  }
  return out;
}

function str(msg, name) {
  const v = msg[name];
  if (typeof v !== "string") throw new TypeError(`${msg.op}: '${name}' must be a string`);
  return v;
}

// -- the reconnect policy (pure) ------------------------------------------------------

export const AUTH_CLOSE_CODES = new Set([4001, 4003]);

/**
 * When to reconnect (rules of engine/client/state.py Reconnector): retry n of a
 * streak waits `rand * min(maxMs, baseMs * factor**n)`; a connection up for
 * `stableMs` ends the streak; `bye` sets the next delay; 4001/4003 block until
 * `newToken()`. `delayMs(rand)` returns null while blocked.
 */
export class Reconnector {
  constructor({ baseMs = 250, maxMs = 30000, factor = 2, stableMs = 30000 } = {}) {
    this.baseMs = baseMs;
    this.maxMs = maxMs;
    this.factor = factor;
    this.stableMs = stableMs;
    this.failures = 0;
    this.upSince = null;
    this.byeMs = null;
    this.blocked = false;
  }

  ceilingMs(attempt) {
    return Math.min(this.maxMs, this.baseMs * Math.pow(this.factor, Math.max(0, attempt)));
  }

  connected(now) {
    if (this.upSince === null) this.upSince = now;
  }

  bye(retryMs) {
    this.byeMs = Math.max(0, Number(retryMs) || 0);
  }

  _failure(now) {
    if (this.upSince !== null && now - this.upSince >= this.stableMs) this.failures = 0;
    this.upSince = null;
    this.failures += 1;
  }

  closed(now, code) {
    if (AUTH_CLOSE_CODES.has(code)) this.blocked = true;
    this._failure(now);
    if (this.byeMs !== null) this.failures -= 1; // a planned close does not grow the streak
  }

  failed(now) {
    this.byeMs = null;
    this._failure(now);
  }

  newToken() {
    this.blocked = false;
    this.failures = 0;
    this.upSince = null;
  }

  /** A token provider gave a new token: reconnect after the usual delay (the streak is kept). */
  unblock() {
    this.blocked = false;
  }

  delayMs(rand) {
    if (this.blocked) return null;
    if (this.byeMs !== null) {
      const d = this.byeMs;
      this.byeMs = null;
      return d;
    }
    const r = Math.min(Math.max(rand, 0), 1);
    return r * this.ceilingMs(Math.max(this.failures - 1, 0));
  }
}

// -- tokens (pure; the rules of engine/client/tokens.py) ---------------------------

/** Tokens longer than this are not decoded (the engine refuses tokens over 8 KiB). */
export const MAX_TOKEN_CHARS = 8192;

/**
 * The token's `exp` in milliseconds since the epoch, read WITHOUT verifying
 * the signature (the server verifies; the client only schedules with it), or
 * null when it has none that can be read: not three dot-separated segments,
 * longer than MAX_TOKEN_CHARS, a payload that is not base64url of a JSON
 * object, an `exp` that is not a finite number.
 */
export function tokenExpiryMs(token) {
  if (typeof token !== "string" || token.length > MAX_TOKEN_CHARS) return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  let claims;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/").replace(/=+$/, "");
    const bin = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    claims = JSON.parse(utf8Decoder.decode(Uint8Array.from(bin, (c) => c.charCodeAt(0))));
  } catch {
    return null; // not base64url, not UTF-8, not JSON (or nested too deep)
  }
  if (!claims || typeof claims !== "object" || Array.isArray(claims)) return null;
  const exp = claims.exp;
  if (typeof exp !== "number" || !Number.isFinite(exp)) return null;
  return exp * 1000;
}

/** When the token refresh is due (defaults of engine/client/tokens.py TokenRefresh). */
export const TOKEN_REFRESH = Object.freeze({ marginFraction: 0.1, minMarginMs: 1000, timeoutMs: 10000 });

/**
 * When to ask for the next token (ms since the epoch): `margin` before `exp`,
 * margin = max(minMarginMs, marginFraction * lifetime), never before half the
 * lifetime; at once for a token expired when obtained; null (never on a
 * schedule) for a token with no known `exp`.
 */
export function refreshAtMs(expMs, obtainedAtMs, { marginFraction = 0.1, minMarginMs = 1000 } = {}) {
  if (expMs === null || expMs === undefined) return null;
  const lifetime = expMs - obtainedAtMs;
  if (lifetime <= 0) return obtainedAtMs;
  const margin = Math.max(minMarginMs, marginFraction * lifetime);
  return Math.max(expMs - margin, obtainedAtMs + lifetime / 2);
}

// -- the client ---------------------------------------------------------------------

export const STATES = Object.freeze(["idle", "connecting", "connected", "waiting", "unauthorized", "closed"]);

/** A resilient subscriber over one WebSocket (see the top of this file). */
export class FanoutClient extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this._tokenProvider = options.tokenProvider ?? null;
    this.tokenRefresh = { ...TOKEN_REFRESH, ...(options.tokenRefresh ?? {}) };
    this._wall = options.wall ?? (() => Date.now());
    this._refreshAt = null; // ms since the epoch; null: no scheduled refresh
    this._refreshTimer = null;
    this._tokenFetch = null; // the provider call in progress (one at a time)
    this._tokenFailures = 0; // consecutive provider failures (backoff streak)
    this._tokenWake = null; // ends a backoff wait between provider calls (close)
    this._fetching = false; // waiting for a token before opening a connection
    this.maxBufferedBytes = options.maxBufferedBytes ?? 1 << 20;
    this.maxOutbox = options.maxOutbox ?? 1000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._random = options.random ?? Math.random;
    this._now = options.now ?? (() => Date.now());
    this.reconnector = new Reconnector(options.backoff ?? {});
    this.view = new StateView();
    this.state = "idle";
    this.counters = {
      connects: 0, connectFailures: 0, disconnects: 0, messages: 0, frames: 0,
      snapsFull: 0, snapsPartial: 0, updates: 0, byes: 0, sendRefused: 0, badValues: 0,
      tokenRefreshes: 0, tokenAuths: 0, tokenFailures: 0,
      lastCloseCode: null, lastRetryMs: null,
    };
    this._subs = new Map(); // topic -> maxHz
    this._sent = new Map(); // id -> topics
    this._waits = new Set();
    this._pending = new Map(); // id -> {resolve, reject} for pub/auth
    this._ids = 1;
    this._ws = null;
    this._outbox = [];
    this._timer = null;
    this._flushTimer = null;
    this._opened = false; // hello (and auth) done on the current socket
    this._closing = false;
    this._useToken(options.token ?? null);
  }

  /** Start connecting (idempotent). */
  connect() {
    if (this._ws || this._timer || this._fetching || this.state === "closed") return this;
    this._closing = false;
    this._open();
    return this;
  }

  /** Close (1000) and stop reconnecting. */
  close() {
    this._closing = true;
    clearTimeout(this._timer);
    this._timer = null;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (this._tokenWake) this._tokenWake();
    if (this._ws) this._ws.close(1000);
    this._setState("closed");
    for (const w of this._waits) w.reject(new Error("the client was closed"));
    this._waits.clear();
  }

  /**
   * Use `token` from the next connection on; after 4001/4003, reconnect now.
   * With a `tokenProvider`, the provider is still called when this token is due.
   */
  setToken(token) {
    this._useToken(token);
    if (this.reconnector.blocked) {
      this.reconnector.newToken();
      if (!this._ws && !this._fetching && !this._closing) this._open();
    }
  }

  /** The latest value of every key of `topic` (a Map; read it, don't change it). */
  topic(name) {
    return this.view.view(name).items;
  }

  /** Subscribe; resolves once every topic's snapshot is in the view. Survives reconnects. */
  subscribe(topics, { maxHz = null } = {}) {
    const names = [...new Set(topics)];
    for (const t of names) this._subs.set(t, maxHz);
    const promise = new Promise((resolve, reject) => {
      const w = { remaining: new Set(names), resolve, reject };
      this._waits.add(w);
    });
    if (this.state === "connected") this._sendSub(names, maxHz);
    return promise;
  }

  unsubscribe(topics) {
    const names = topics.filter((t) => this._subs.has(t));
    for (const t of names) {
      this._subs.delete(t);
      this.view.forget(t);
    }
    if (names.length && this.state === "connected") this.send({ op: "unsub", topics: names, id: this._ids++ });
  }

  /** Publish over the WebSocket (needs permission); resolves with the position. */
  publish(topic, key, data) {
    const id = this._ids++;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve: (m) => resolve(m.pos), reject });
      if (!this.send({ op: "pub", topic, key, data, id })) {
        this._pending.delete(id);
        reject(new Error("not sent: outbox full or not connected"));
      }
    });
  }

  /**
   * Send one message. Goes out now when the socket's bufferedAmount is under
   * `maxBufferedBytes`; otherwise waits in the outbox (at most `maxOutbox`
   * messages: beyond, the message is refused and false is returned).
   */
  send(msg) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    const bytes = encode(msg);
    if (this._outbox.length === 0 && ws.bufferedAmount <= this.maxBufferedBytes) {
      ws.send(bytes);
      return true;
    }
    if (this._outbox.length >= this.maxOutbox) {
      this.counters.sendRefused += 1;
      return false;
    }
    this._outbox.push(bytes);
    this._scheduleFlush();
    return true;
  }

  _scheduleFlush() {
    if (this._flushTimer) return;
    this._flushTimer = setTimeout(() => {
      this._flushTimer = null;
      const ws = this._ws;
      if (!ws || ws.readyState !== 1) { this._outbox = []; return; }
      while (this._outbox.length && ws.bufferedAmount <= this.maxBufferedBytes) ws.send(this._outbox.shift());
      if (this._outbox.length) this._scheduleFlush();
    }, 50);
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state } }));
  }

  // -- the token (rules: engine/client/tokens.py) -----------------------------------

  _useToken(token) {
    this.token = token;
    const exp = token === null ? null : tokenExpiryMs(token);
    this._refreshAt = refreshAtMs(exp, this._wall(), this.tokenRefresh);
  }

  _tokenDue() {
    if (!this._tokenProvider) return false;
    if (this.token === null) return true;
    return this._refreshAt !== null && this._wall() >= this._refreshAt;
  }

  /** One provider call, bounded by tokenRefresh.timeoutMs; the token is checked before use. */
  _callProvider() {
    const timeoutMs = this.tokenRefresh.timeoutMs;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the token provider did not answer within ${timeoutMs} ms`)), timeoutMs);
      Promise.resolve()
        .then(() => this._tokenProvider())
        .then((token) => {
          if (typeof token !== "string") throw new TypeError(`the token provider gave a ${typeof token}, not a string`);
          const exp = tokenExpiryMs(token);
          if (exp !== null && exp <= this._wall()) throw new Error(`the token provider gave a token that expired ${(this._wall() - exp) / 1000} s ago`);
          return token;
        })
        .then(resolve, reject)
        .finally(() => clearTimeout(timer));
    });
  }

  /**
   * Call the provider until it gives a usable token; resolves true then, false
   * if the client was closed first. Each failure is an "error" event (code
   * "token_provider") followed by a backoff delay (rand * the reconnect
   * ceiling of the streak). One call at a time: callers share it.
   */
  _obtainToken() {
    if (this._tokenFetch) return this._tokenFetch;
    const run = async () => {
      while (!this._closing) {
        try {
          const token = await this._callProvider();
          if (this._closing) return false;
          this._tokenFailures = 0;
          this.counters.tokenRefreshes += 1;
          this._useToken(token);
          return true;
        } catch (err) {
          this._tokenFailures += 1;
          this.counters.tokenFailures += 1;
          const msg = String((err && err.message) || err);
          this.dispatchEvent(new CustomEvent("error", { detail: { code: "token_provider", msg, error: err } }));
          const delay = this._random() * this.reconnector.ceilingMs(this._tokenFailures - 1);
          await new Promise((resolve) => {
            const timer = setTimeout(() => { this._tokenWake = null; resolve(); }, delay);
            this._tokenWake = () => { clearTimeout(timer); this._tokenWake = null; resolve(); };
          });
        }
      }
      return false;
    };
    this._tokenFetch = run().finally(() => { this._tokenFetch = null; });
    return this._tokenFetch;
  }

  /** While connected: a timer for the next refresh of the current token (none without a known exp). */
  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this._tokenProvider || this._refreshAt === null || this._closing) return;
    const ws = this._ws;
    this._refreshTimer = setTimeout(() => this._refreshLive(ws), Math.max(0, this._refreshAt - this._wall()));
  }

  /** A new token sent in `auth` on the live connection `ws` (the server acks, or closes 4001). */
  async _refreshLive(ws) {
    this._refreshTimer = null;
    if (!(await this._obtainToken())) return;
    if (this._ws !== ws || !this._opened || ws.readyState !== 1) return; // the next connection sends it
    const id = this._ids++;
    ws.send(encode({ op: "auth", token: this.token, id }));
    this.counters.tokenAuths += 1;
    this._scheduleRefresh();
  }

  // -- the connection ---------------------------------------------------------------

  _open() {
    this._timer = null;
    if (this._tokenDue()) {
      // no token yet, or the current one is due: a fresh one before connecting
      this._setState("waiting");
      this._fetching = true;
      this._obtainToken().then((ok) => {
        this._fetching = false;
        if (ok && !this._closing && !this._ws) this._open();
      });
      return;
    }
    this._setState("connecting");
    let ws;
    try {
      ws = new this._WebSocket(this.url, ["fanout.v1"]);
    } catch (err) {
      this.counters.connectFailures += 1;
      this.reconnector.failed(this._now());
      this._retry();
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._opened = false;
    const helloTimer = setTimeout(() => { if (!this._opened) ws.close(); }, this.connectTimeoutMs);
    ws.onmessage = (ev) => this._onFrame(ws, ev.data);
    ws.onclose = (ev) => {
      clearTimeout(helloTimer);
      if (this._ws !== ws) return;
      this._ws = null;
      clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
      this._outbox = [];
      for (const [, p] of this._pending) p.reject(new Error("connection closed"));
      this._pending.clear();
      this.counters.lastCloseCode = ev.code;
      if (this._opened) {
        this.counters.disconnects += 1;
        this.reconnector.closed(this._now(), ev.code);
      } else {
        this.counters.connectFailures += 1;
        if (AUTH_CLOSE_CODES.has(ev.code)) this.reconnector.closed(this._now(), ev.code);
        else this.reconnector.failed(this._now());
      }
      this._opened = false;
      if (!this._closing) this._retry();
    };
  }

  _retry() {
    const delay = this.reconnector.delayMs(this._random());
    if (delay === null && this._tokenProvider) {
      // closed 4001/4003: a new token first, then the backoff delay as after any
      // close (tokens the server keeps refusing must not reconnect in a loop)
      this._setState("waiting");
      this._fetching = true;
      this._obtainToken().then((ok) => {
        this._fetching = false;
        if (!ok || this._closing || this._ws) return;
        this.reconnector.unblock();
        this._retry();
      });
      return;
    }
    if (delay === null) {
      this._setState("unauthorized");
      return;
    }
    this.counters.lastRetryMs = delay;
    this._setState("waiting");
    this._timer = setTimeout(() => this._open(), delay);
  }

  _onFrame(ws, data) {
    if (typeof data === "string") return; // protocol v1 sends binary frames only
    this.counters.frames += 1;
    let messages;
    try {
      // a value it cannot decode arrives as an Undecodable (reported in _handle);
      // only a broken frame (truncated, not msgpack) throws: the server broke the protocol
      messages = decodeFrame(new Uint8Array(data));
    } catch (err) {
      this.dispatchEvent(new CustomEvent("error", { detail: { code: "bad_frame", msg: String(err) } }));
      // a browser's close() takes only 1000 or 3000-4999 (1002 throws InvalidAccessError)
      ws.close(4002, "undecodable frame");
      return;
    }
    for (const msg of messages) this._handle(ws, msg);
  }

  _handle(ws, msg) {
    this.counters.messages += 1;
    const op = msg && msg.op;
    if (op === "hello") {
      if (this.token !== null) {
        const id = this._ids++;
        this._pending.set(id, { resolve: () => this._ready(), reject: () => {} });
        ws.send(encode({ op: "auth", token: this.token, id }));
      } else {
        this._ready();
      }
      return;
    }
    if (op === "ack") {
      const p = this._pending.get(msg.id);
      if (p) { this._pending.delete(msg.id); p.resolve(msg); }
      this._sent.delete(msg.id);
      return;
    }
    if (op === "err") return this._refused(msg);
    if (op === "bye") {
      this.counters.byes += 1;
      this.reconnector.bye(msg.retry_ms);
      this.dispatchEvent(new CustomEvent("bye", { detail: msg }));
      return;
    }
    if (!this._subs.has(msg.topic)) return; // in flight when we unsubscribed: not ours to keep
    const change = this.view.apply(msg);
    if (!change) return;
    for (const [key, bad] of undecodableIn(change)) {
      this.counters.badValues += 1;
      this.dispatchEvent(new CustomEvent("error", { detail: { code: "bad_value", msg: bad.reason, topic: change.topic, key } }));
    }
    if (change.kind === "snap") {
      if (change.full) this.counters.snapsFull += 1;
      else this.counters.snapsPartial += 1;
      for (const w of [...this._waits]) {
        w.remaining.delete(change.topic);
        if (w.remaining.size === 0) { this._waits.delete(w); w.resolve(); }
      }
    }
    this.counters.updates += Object.keys(change.items).length;
    this.dispatchEvent(new CustomEvent("change", { detail: change }));
  }

  _ready() {
    this._opened = true;
    this.counters.connects += 1;
    this.reconnector.connected(this._now());
    this._setState("connected");
    this._scheduleRefresh();
    const groups = new Map();
    for (const [t, hz] of this._subs) {
      if (!groups.has(hz)) groups.set(hz, []);
      groups.get(hz).push(t);
    }
    for (const [hz, names] of groups) this._sendSub(names, hz);
  }

  _sendSub(names, maxHz) {
    const id = this._ids++;
    this._sent.set(id, names);
    const msg = { op: "sub", topics: names, id };
    const since = this.view.since(names);
    if (Object.keys(since).length) msg.since = since;
    if (maxHz !== null && maxHz !== undefined) msg.max_hz = maxHz;
    this.send(msg);
  }

  _refused(msg) {
    const detail = { code: msg.code, msg: msg.msg, topic: msg.topic ?? null };
    const p = this._pending.get(msg.id);
    if (p) { this._pending.delete(msg.id); p.reject(Object.assign(new Error(`${msg.code}: ${msg.msg}`), detail)); }
    const names = this._sent.get(msg.id);
    if (names) {
      this._sent.delete(msg.id);
      for (const t of names) this._subs.delete(t); // `sub` is all or nothing
      for (const w of [...this._waits]) {
        if (names.some((t) => w.remaining.has(t))) {
          this._waits.delete(w);
          w.reject(Object.assign(new Error(`${msg.code}: ${msg.msg}`), detail));
        }
      }
    }
    this.dispatchEvent(new CustomEvent("error", { detail }));
  }
}
