// Unit tests of engine/static/fanout.js: the msgpack codec, the state view,
// the reconnect policy, and the client driven by a fake WebSocket and mocked
// timers (no network, no sleeps). Run by tests/unit/test_fanout_js.py
// (`node --test`), which also passes msgpack fixtures made by Python's msgpack.
import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import {
  decode, decodeAll, decodeFrame, encode, Ext, StateView, Reconnector, FanoutClient,
  Undecodable, undecodableIn, MAX_DATA_DEPTH, CLIENT_MAX_DEPTH,
  tokenExpiryMs, refreshAtMs, TOKEN_REFRESH, MAX_TOKEN_CHARS,
} from "../../engine/static/fanout.js";

const hex = (b) => Buffer.from(b).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));
const revive = (v) => {
  if (Array.isArray(v)) return v.map(revive);
  if (v && typeof v === "object") {
    if ("$bin" in v) return unhex(v.$bin);
    if ("$big" in v) return BigInt(v.$big);
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, revive(x)]));
  }
  return v;
};

test("decodes what Python's msgpack encodes, and Python decodes what we encode", () => {
  const path = process.env.FANOUT_MSGPACK_FIXTURES;
  if (!path) return; // run from pytest only
  const cases = JSON.parse(readFileSync(path, "utf8"));
  const out = [];
  for (const c of cases) {
    const expected = revive(c.value);
    assert.deepEqual(decode(unhex(c.hex)), expected, `decoding ${c.hex}`);
    out.push(hex(encode(expected)));
  }
  writeFileSync(process.env.FANOUT_MSGPACK_OUT, JSON.stringify(out));
});

test("a frame with several messages back to back decodes to all of them", () => {
  const frame = new Uint8Array([...encode({ op: "ack", id: 1 }), ...encode({ op: "upd", topic: "t", pos: "1-0", items: { a: 1 } })]);
  assert.deepEqual(decodeAll(frame), [{ op: "ack", id: 1 }, { op: "upd", topic: "t", pos: "1-0", items: { a: 1 } }]);
});

test("truncated input, unknown bytes and deep nesting throw instead of guessing", () => {
  const full = encode({ op: "upd", items: { key: "value" } });
  for (let n = 1; n < full.length; n++) assert.throws(() => decodeAll(full.subarray(0, n)), RangeError);
  assert.throws(() => decodeAll(new Uint8Array([0xc1])), RangeError);
  let deep = new Uint8Array([0x01]);
  for (let i = 0; i < 100; i++) deep = new Uint8Array([0x91, ...deep]);
  assert.throws(() => decodeAll(deep), RangeError);
});

test("every integer width round-trips, big ones as BigInt", () => {
  const values = [0, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, -(2 ** 53) + 1];
  for (const v of values) assert.equal(decode(encode(v)), v);
  assert.equal(decode(encode(2n ** 63n)), 2n ** 63n);
  assert.equal(decode(encode(-(2n ** 63n))), -(2n ** 63n));
  assert.equal(decode(encode(0.1)), 0.1);
  const s = "x".repeat(70000);
  assert.equal(decode(encode(s)), s);
  const ext = decode(new Uint8Array([0xd4, 0x05, 0xaa]));
  assert.ok(ext instanceof Ext && ext.type === 5 && ext.data[0] === 0xaa);
});

test("a key named __proto__ is plain data", () => {
  const m = decode(encode(new Map([["__proto__", 1]])));
  assert.equal(Object.getPrototypeOf(m), Object.prototype);
  assert.equal(m["__proto__"], 1);
});

test("state view: full snap replaces, partial snap merges, nil deletes", () => {
  const v = new StateView();
  let c = v.apply({ op: "snap", topic: "t", epoch: "e1", pos: "1-0", full: true, items: { a: 1, b: 2 } });
  assert.equal(c.full, true);
  assert.deepEqual([...v.view("t").items], [["a", 1], ["b", 2]]);
  c = v.apply({ op: "upd", topic: "t", pos: "2-0", items: { a: 10, b: null } });
  assert.deepEqual(c.items, { a: 10, b: null });
  assert.deepEqual(Object.fromEntries(v.view("t").items), { a: 10 });
  assert.deepEqual(v.since(), { t: ["e1", "2-0"] });
  c = v.apply({ op: "snap", topic: "t", epoch: "e1", pos: "3-0", full: false, items: { c: 3, a: null } });
  assert.equal(c.full, false);
  assert.deepEqual(Object.fromEntries(v.view("t").items), { c: 3 });
  c = v.apply({ op: "snap", topic: "t", epoch: "e2", pos: "1-0", full: true, items: { z: 1 } });
  assert.deepEqual(c.items, { c: null, z: 1 }, "a full snap reports the keys it removed");
  assert.deepEqual(v.since(), { t: ["e2", "1-0"] });
  assert.equal(v.apply({ op: "hello" }), null);
  assert.throws(() => v.apply({ op: "upd", topic: "t", items: {} }), TypeError);
});

test("state view: a stream topic's snap, evt and gap surface every event and move the mark", () => {
  const v = new StateView();
  let c = v.apply({ op: "snap", topic: "s", epoch: "e1", pos: "2-0", full: true, items: [["1-0", "a"], ["2-0", "b"]] });
  assert.deepEqual([c.kind, c.full, c.events], ["snap", true, [["1-0", "a"], ["2-0", "b"]]]);
  assert.deepEqual(v.since(), { s: ["e1", "2-0"] });
  // what the engine sends a connection that fell behind: a gap, then the later events, in one frame
  const frame = new Uint8Array([
    ...encode({ op: "gap", topic: "s", from: "2-0", to: "7-0" }),
    ...encode({ op: "evt", topic: "s", items: [["8-0", "h"], ["9-0", { px: 1 }]] }),
  ]);
  const [gap, evt] = decodeAll(frame).map((m) => v.apply(m));
  assert.deepEqual([gap.kind, gap.from, gap.to], ["gap", "2-0", "7-0"]);
  assert.deepEqual([evt.kind, evt.events, evt.pos], ["evt", [["8-0", "h"], ["9-0", { px: 1 }]], "9-0"]);
  assert.deepEqual(v.since(), { s: ["e1", "9-0"] }, "a resubscription asks for what follows");
  c = v.apply({ op: "snap", topic: "s", epoch: "e1", pos: "9-0", full: false, items: [] });
  assert.deepEqual([c.full, c.events, c.pos], [false, [], "9-0"]);
  assert.throws(() => v.apply({ op: "evt", topic: "s", items: {} }), TypeError);
});

test("reconnector: full jitter under a growing, capped ceiling; stable reset; bye; 4001", () => {
  const r = new Reconnector({ baseMs: 100, maxMs: 1000, factor: 2, stableMs: 30000 });
  const ceilings = [];
  for (let i = 0; i < 6; i++) {
    r.failed(i);
    ceilings.push(r.delayMs(0.999999));
  }
  assert.deepEqual(ceilings.map(Math.round), [100, 200, 400, 800, 1000, 1000]);
  assert.equal(r.delayMs(0), 0);
  assert.equal(r.delayMs(0.5), 500);
  r.connected(100);
  r.closed(100 + 30000, 1006);
  assert.equal(r.failures, 1, "a connection up for stableMs ends the streak");
  r.bye(1234);
  r.closed(100 + 30001, 1001);
  assert.equal(r.delayMs(0.5), 1234);
  r.closed(0, 4001);
  assert.equal(r.delayMs(0.5), null);
  r.newToken();
  assert.equal(r.delayMs(0.5), 50);
});

// A fake WebSocket: the test plays the server.
class FakeSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.bufferedAmount = 0;
    this.sent = [];
    FakeSocket.all.push(this);
  }
  send(bytes) { this.sent.push(decode(bytes)); }
  close(code = 1000) {
    // as a browser's WebSocket: only 1000 and 3000-4999 may be sent (else InvalidAccessError)
    if (code !== 1000 && (code < 3000 || code > 4999)) throw new Error(`InvalidAccessError: close(${code})`);
    this.serverClose(code);
  }
  open() { this.readyState = 1; this.recv({ op: "hello", v: 1, conn: "c", node: "n", auth: false }); }
  recv(...msgs) { this.onmessage({ data: msgs.map((m) => encode(m)).reduce((a, b) => new Uint8Array([...a, ...b])).buffer }); }
  recvBytes(bytes) { this.onmessage({ data: new Uint8Array(bytes).buffer }); }
  serverClose(code) { if (this.readyState === 3) return; this.readyState = 3; this.onclose({ code }); }
}

test("client: resubscribes with since after a drop, honours bye, stops on 4001 until setToken", () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    FakeSocket.all = [];
    const randoms = [0.5, 0.5, 0.5, 0.5];
    const client = new FanoutClient("ws://x/ws", { WebSocket: FakeSocket, random: () => randoms.shift() ?? 0.5, now: () => 0, backoff: { baseMs: 100, maxMs: 1000 } });
    const states = [];
    client.addEventListener("state", (e) => states.push(e.detail.state));
    client.connect();
    let ws = FakeSocket.all[0];
    assert.deepEqual(ws.protocols, ["fanout.v1"]);
    ws.open();
    let subscribed = false;
    client.subscribe(["t"]).then(() => { subscribed = true; });
    assert.deepEqual(ws.sent[0], { op: "sub", topics: ["t"], id: 1 });
    ws.recv({ op: "ack", id: 1 }, { op: "snap", topic: "t", epoch: "e", pos: "5-0", full: true, items: { a: 1, b: 2 } });
    ws.recv({ op: "upd", topic: "t", pos: "6-0", items: { a: 3 } });
    // the server kills the connection: a retry after rand * base = 50 ms, with since
    ws.serverClose(1006);
    assert.equal(client.state, "waiting");
    assert.equal(client.counters.lastRetryMs, 50);
    mock.timers.tick(49);
    assert.equal(FakeSocket.all.length, 1);
    mock.timers.tick(1);
    ws = FakeSocket.all[1];
    ws.open();
    assert.deepEqual(ws.sent[0], { op: "sub", topics: ["t"], id: 2, since: { t: ["e", "6-0"] } });
    ws.recv({ op: "ack", id: 2 }, { op: "snap", topic: "t", epoch: "e", pos: "7-0", full: false, items: { b: null, c: 4 } });
    assert.deepEqual(Object.fromEntries(client.topic("t")), { a: 3, c: 4 });
    assert.equal(client.counters.snapsPartial, 1);
    // bye: the next attempt waits exactly retry_ms
    ws.recv({ op: "bye", reason: "restart", retry_ms: 700 });
    ws.serverClose(1012);
    assert.equal(client.counters.lastRetryMs, 700);
    mock.timers.tick(700);
    ws = FakeSocket.all[2];
    ws.open();
    // 4001: no reconnect, whatever the time, until setToken
    ws.serverClose(4001);
    assert.equal(client.state, "unauthorized");
    mock.timers.tick(600000);
    assert.equal(FakeSocket.all.length, 3);
    client.setToken("good");
    ws = FakeSocket.all[3];
    assert.ok(ws, "setToken reconnects at once");
    ws.open();
    assert.deepEqual(ws.sent[0], { op: "auth", token: "good", id: 4 });
    ws.recv({ op: "ack", id: 4, user: "u" });
    assert.equal(client.state, "connected");
    assert.deepEqual(ws.sent[1].since, { t: ["e", "7-0"] });
    client.close();
    assert.equal(client.state, "closed");
    assert.ok(states.includes("unauthorized") && states.includes("waiting"));
  } finally {
    mock.timers.reset();
  }
});

test("client: sends wait while bufferedAmount is over the limit, in a bounded outbox", () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    FakeSocket.all = [];
    const client = new FanoutClient("ws://x/ws", { WebSocket: FakeSocket, maxBufferedBytes: 100, maxOutbox: 2 });
    client.connect();
    const ws = FakeSocket.all[0];
    ws.open();
    ws.bufferedAmount = 1000;
    assert.equal(client.send({ op: "ping", id: 1 }), true);
    assert.equal(client.send({ op: "ping", id: 2 }), true);
    assert.equal(client.send({ op: "ping", id: 3 }), false, "outbox full: refused, not dropped silently");
    assert.equal(client.counters.sendRefused, 1);
    assert.equal(ws.sent.length, 0);
    mock.timers.tick(50);
    assert.equal(ws.sent.length, 0, "still over the limit");
    ws.bufferedAmount = 0;
    mock.timers.tick(50);
    assert.deepEqual(ws.sent.map((m) => m.id), [1, 2]);
    client.close();
  } finally {
    mock.timers.reset();
  }
});

test("client: a refused sub rejects its promise and is forgotten", async () => {
  FakeSocket.all = [];
  const client = new FanoutClient("ws://x/ws", { WebSocket: FakeSocket });
  client.connect();
  const ws = FakeSocket.all[0];
  ws.open();
  const p = client.subscribe(["bad topic"]);
  ws.recv({ op: "err", id: 1, code: "bad_topic", msg: "bad topic name", topic: "bad topic" });
  await assert.rejects(p, (e) => e.code === "bad_topic");
  client.close();
});

// -- values a client cannot decode (issue 11, finding 7) --------------------------------------

const cat = (...parts) => new Uint8Array(parts.flatMap((p) => [...p]));
const deep = (n, leaf = [0x01]) => new Uint8Array([...new Array(n).fill(0x91), ...leaf]); // [[...[1]]]
const BAD_UTF8 = new Uint8Array([0xa3, 0xed, 0xa0, 0x80]); // U+D800 encoded as a character
/** An `upd` frame whose item values are given as raw msgpack bytes. */
const updBytes = (topic, pos, pairs) => cat(
  [0x84], encode("op"), encode("upd"), encode("topic"), encode(topic), encode("pos"), encode(pos),
  encode("items"), [0x80 | pairs.length], ...pairs.flatMap(([k, v]) => [encode(k), v]),
);
const evtBytes = (topic, events) => cat(
  [0x83], encode("op"), encode("evt"), encode("topic"), encode(topic), encode("items"),
  [0x90 | events.length], ...events.flatMap(([pos, v]) => [[0x92], encode(pos), v]),
);
const nestedValue = (n) => { let v = 1; for (let i = 0; i < n; i++) v = [v]; return v; };

test("the nesting limit is the engine's: 32 for data, 35 for a whole message", () => {
  assert.equal(MAX_DATA_DEPTH, 32);
  assert.equal(CLIENT_MAX_DEPTH, MAX_DATA_DEPTH + 3);
  // a stream snap holds data at the limit: message, items, [pos, data], then 32 levels
  const snap = { op: "snap", topic: "s", epoch: "e", pos: "1-0", full: true, items: [["1-0", nestedValue(MAX_DATA_DEPTH)]] };
  assert.deepEqual(decodeAll(encode(snap)), [snap]);
  assert.deepEqual(decodeFrame(encode(snap)), [snap]);
  assert.throws(() => decodeAll(cat([0x81, 0xa1, 0x61], deep(CLIENT_MAX_DEPTH))), RangeError);
  assert.throws(() => encode({ a: nestedValue(CLIENT_MAX_DEPTH) }), RangeError);
  assert.ok(encode({ op: "pub", topic: "t", key: "k", data: nestedValue(MAX_DATA_DEPTH) }));
});

test("decodeFrame: a value it cannot decode becomes an Undecodable, the rest of the frame is kept", () => {
  const frame = cat(
    updBytes("t", "2-0", [["a", encode(1)], ["deep", deep(MAX_DATA_DEPTH + 1)], ["utf8", cat([0x91], BAD_UTF8)], ["z", encode(null)], ["ok", deep(MAX_DATA_DEPTH)]]),
    evtBytes("s", [["3-0", BAD_UTF8], ["3-1", encode("fine")]]),
    encode({ op: "pong", id: 9, ts: 1 }),
  );
  const [upd, evt, pong] = decodeFrame(frame);
  assert.equal(upd.items.a, 1);
  assert.equal(upd.items.z, null);
  assert.deepEqual(upd.items.ok, nestedValue(MAX_DATA_DEPTH));
  assert.ok(upd.items.deep instanceof Undecodable && upd.items.deep.reason.includes("32"));
  assert.ok(upd.items.utf8 instanceof Undecodable && upd.items.utf8.reason.includes("UTF-8"));
  assert.ok(evt.items[0][1] instanceof Undecodable);
  assert.deepEqual(evt.items[1], ["3-1", "fine"]);
  assert.deepEqual(pong, { op: "pong", id: 9, ts: 1 });
  const change = new StateView().apply(upd);
  assert.deepEqual(undecodableIn(change).map(([k]) => k), ["deep", "utf8"]);
  assert.deepEqual(undecodableIn(new StateView().apply(evt)).map(([k]) => k), ["3-0"]);
});

test("decodeFrame: a broken frame still throws (the server broke the protocol)", () => {
  const good = updBytes("t", "1-0", [["k", BAD_UTF8]]);
  for (let n = 1; n < good.length; n++) assert.throws(() => decodeFrame(good.subarray(0, n)), RangeError);
  assert.throws(() => decodeFrame(updBytes("t", "1-0", [["k", new Uint8Array([0x91, 0xc1])]])), RangeError); // no length to skip
  assert.throws(() => decodeFrame(encode([1])), RangeError); // not a map
});

test("client: a value it cannot decode is an error event, not a close and a reconnect loop", () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    FakeSocket.all = [];
    const client = new FanoutClient("ws://x/ws", { WebSocket: FakeSocket });
    const errors = [];
    client.addEventListener("error", (e) => errors.push(e.detail));
    client.connect();
    const ws = FakeSocket.all[0];
    ws.open();
    client.subscribe(["t"]);
    ws.recv({ op: "ack", id: 1 }, { op: "snap", topic: "t", epoch: "e", pos: "1-0", full: true, items: { a: 1, deep: 1 } });
    ws.recvBytes(updBytes("t", "2-0", [["deep", deep(1000)], ["a", encode(2)]]));
    ws.recvBytes(evtBytes("t", [["3-0", BAD_UTF8]]));
    assert.deepEqual(errors.map((d) => [d.code, d.topic, d.key]), [["bad_value", "t", "deep"], ["bad_value", "t", "3-0"]]);
    assert.equal(client.counters.badValues, 2);
    assert.equal(client.state, "connected");
    assert.equal(ws.readyState, 1, "the connection was not closed");
    mock.timers.tick(60000);
    assert.equal(FakeSocket.all.length, 1, "no reconnect");
    assert.equal(client.topic("t").get("a"), 2, "the other key of the frame was applied");
    assert.ok(client.topic("t").get("deep") instanceof Undecodable);
    ws.recv({ op: "upd", topic: "t", pos: "4-0", items: { deep: 3 } });
    assert.equal(client.topic("t").get("deep"), 3, "a readable value replaces it");
    client.close();
  } finally {
    mock.timers.reset();
  }
});

test("client: a broken frame closes with a code a browser may send (4002) and reconnects", () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    FakeSocket.all = [];
    const client = new FanoutClient("ws://x/ws", { WebSocket: FakeSocket });
    const errors = [];
    const closes = [];
    client.addEventListener("error", (e) => errors.push(e.detail.code));
    client.connect();
    const ws = FakeSocket.all[0];
    const onclose = ws.onclose;
    ws.onclose = (ev) => { closes.push(ev.code); onclose(ev); };
    ws.open();
    ws.recvBytes([0x81]); // a one-element array announced, nothing follows: not a frame
    assert.deepEqual(errors, ["bad_frame"]);
    assert.deepEqual(closes, [4002]);
    mock.timers.tick(60000);
    assert.equal(FakeSocket.all.length, 2, "reconnected after its backoff");
    client.close();
  } finally {
    mock.timers.reset();
  }
});

// -- tokens: exp read without verification, the refresh schedule, the provider ---------

const b64url = (text) => Buffer.from(text).toString("base64url");
const jwtWith = (payload) => `${b64url('{"alg":"HS256"}')}.${b64url(JSON.stringify(payload))}.c2ln`;
const rawJwt = (payloadText) => `${b64url('{"alg":"HS256"}')}.${b64url(payloadText)}.c2ln`;

test("tokenExpiryMs: exp read without verification, null for anything malformed", () => {
  assert.equal(tokenExpiryMs(jwtWith({ exp: 1700000000, sub: "x" })), 1700000000000);
  assert.equal(tokenExpiryMs(jwtWith({ exp: 1700000000.25 })), 1700000000250);
  assert.equal(tokenExpiryMs(jwtWith({ exp: 10 })), 10000); // in the past: still read
  const padded = `x.${Buffer.from('{"exp": 42}').toString("base64")}.y`;
  assert.ok(padded.includes("="));
  assert.equal(tokenExpiryMs(padded), 42000);
  const malformed = [
    "", "opaque", "a.b", "a.b.c.d", "x.!!!.y", rawJwt("not json"), `x.${Buffer.from([0xff, 0xfe]).toString("base64url")}.y`,
    jwtWith([1, 2]), jwtWith("exp"), jwtWith({ sub: "no exp" }), jwtWith({ exp: "1700000000" }), jwtWith({ exp: true }),
    jwtWith({ exp: null }), rawJwt('{"exp": 1e999}'), rawJwt("[".repeat(3000) + "]".repeat(3000)),
    jwtWith({ exp: 1700000000, pad: "x".repeat(MAX_TOKEN_CHARS) }), null, 42,
  ];
  for (const token of malformed) assert.equal(tokenExpiryMs(token), null, String(token).slice(0, 40));
});

test("refreshAtMs: max(1 s, 10 %) before exp, never before half the lifetime", () => {
  assert.equal(refreshAtMs(103000, 100000, TOKEN_REFRESH), 102000); // a 3-s token: 1 s before
  assert.equal(refreshAtMs(3600000, 0, TOKEN_REFRESH), 3240000); // 1 h: 6 min before
  assert.equal(refreshAtMs(110000, 100000, { marginFraction: 0.5, minMarginMs: 0 }), 105000);
  assert.equal(refreshAtMs(100800, 100000, TOKEN_REFRESH), 100400); // 0.8 s: at half, not at once
  assert.equal(refreshAtMs(90000, 100000, TOKEN_REFRESH), 100000); // expired: due at once
  assert.equal(refreshAtMs(null, 100000, TOKEN_REFRESH), null); // no exp: never on a schedule
});

const flush = () => new Promise((resolve) => setImmediate(resolve));
const tokenFor = (ttlMs, now = Date.now()) => jwtWith({ exp: (now + ttlMs) / 1000, sub: "u" });

test("client: a token provider keeps the token fresh on the live connection", async () => {
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  try {
    FakeSocket.all = [];
    let calls = 0;
    const provider = () => { calls += 1; return Promise.resolve(tokenFor(3000)); };
    const client = new FanoutClient("ws://x/ws", { WebSocket: FakeSocket, random: () => 1, tokenProvider: provider, backoff: { baseMs: 100, maxMs: 1000 } });
    const states = [];
    client.addEventListener("state", (e) => states.push(e.detail.state));
    client.connect();
    assert.equal(FakeSocket.all.length, 0, "the provider is called before connecting");
    await flush();
    assert.equal(calls, 1);
    const ws = FakeSocket.all[0];
    ws.open();
    assert.equal(ws.sent[0].op, "auth");
    assert.equal(ws.sent[0].token, client.token);
    ws.recv({ op: "ack", id: ws.sent[0].id, user: "u" });
    assert.equal(client.state, "connected");
    for (let i = 1; i <= 5; i++) {
      mock.timers.tick(1999);
      await flush();
      assert.equal(calls, i, "not before 1 s ahead of exp");
      mock.timers.tick(1);
      await flush();
      assert.equal(calls, i + 1);
      const auth = ws.sent[ws.sent.length - 1];
      assert.deepEqual([auth.op, auth.token], ["auth", client.token]);
      ws.recv({ op: "ack", id: auth.id, user: "u" });
    }
    assert.equal(FakeSocket.all.length, 1, "no reconnect");
    assert.deepEqual([client.counters.tokenRefreshes, client.counters.tokenAuths, client.counters.tokenFailures], [6, 5, 0]);
    assert.deepEqual(states, ["waiting", "connecting", "connected"]);
    client.close();
    mock.timers.tick(60000);
    await flush();
    assert.equal(calls, 6, "nothing after close");
  } finally {
    mock.timers.reset();
  }
});

test("client: a failing provider is retried with backoff, an error event each time, the connection kept", async () => {
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  try {
    FakeSocket.all = [];
    const script = [
      () => tokenFor(3000),
      () => { throw new Error("issuer down"); },
      () => Promise.reject(new Error("issuer still down")),
      () => new Promise(() => {}), // never answers: timed out
      () => tokenFor(-5000), // expired already
      () => 12345, // not a string
      () => tokenFor(60000),
    ];
    let calls = 0;
    const provider = () => script[calls++]();
    const client = new FanoutClient("ws://x/ws", {
      WebSocket: FakeSocket, random: () => 1, tokenProvider: provider,
      tokenRefresh: { timeoutMs: 500 }, backoff: { baseMs: 100, maxMs: 1000 },
    });
    const errors = [];
    client.addEventListener("error", (e) => errors.push(e.detail));
    client.connect();
    await flush();
    const ws = FakeSocket.all[0];
    ws.open();
    ws.recv({ op: "ack", id: ws.sent[0].id, user: "u" });
    mock.timers.tick(2000); // refresh due: call 2 throws
    await flush();
    assert.equal(calls, 2);
    assert.equal(errors.length, 1);
    // backoff ceilings (random 1): 100, 200, the hung call's 500 ms timeout, 400, 800, 1000 (max)
    for (const [wait, expectCalls, expectErrors] of [[99, 2, 1], [1, 3, 2], [199, 3, 2], [1, 4, 2], [499, 4, 2], [1, 4, 3], [399, 4, 3], [1, 5, 4], [799, 5, 4], [1, 6, 5], [999, 6, 5], [1, 7, 5]]) {
      mock.timers.tick(wait);
      await flush();
      assert.deepEqual([calls, errors.length], [expectCalls, expectErrors], `after +${wait} ms`);
    }
    assert.ok(errors.every((e) => e.code === "token_provider"));
    assert.match(errors[0].msg, /issuer down/);
    assert.match(errors[2].msg, /did not answer within 500 ms/);
    assert.match(errors[3].msg, /expired/);
    assert.match(errors[4].msg, /not a string/);
    const auth = ws.sent[ws.sent.length - 1];
    assert.deepEqual([auth.op, auth.token], ["auth", client.token]);
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(client.state, "connected");
    assert.deepEqual([client.counters.tokenFailures, client.counters.tokenAuths, client.counters.connects], [5, 1, 1]);
    client.close();
  } finally {
    mock.timers.reset();
  }
});

test("client: after 4003 the provider is called before reconnecting; refused tokens back off", async () => {
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  try {
    FakeSocket.all = [];
    let calls = 0;
    const provider = async () => { calls += 1; return tokenFor(60000); };
    const client = new FanoutClient("ws://x/ws", { WebSocket: FakeSocket, random: () => 1, tokenProvider: provider, backoff: { baseMs: 100, maxMs: 1000 } });
    const states = [];
    client.addEventListener("state", (e) => states.push(e.detail.state));
    client.connect();
    await flush();
    let ws = FakeSocket.all[0];
    ws.open();
    ws.recv({ op: "ack", id: ws.sent[0].id, user: "u" });
    ws.serverClose(4003); // e.g. revoked
    await flush();
    assert.equal(calls, 2, "a new token before reconnecting");
    assert.equal(client.counters.lastRetryMs, 100, "then the backoff delay of a first failure");
    mock.timers.tick(100);
    ws = FakeSocket.all[1];
    ws.open();
    assert.equal(ws.sent[0].token, client.token);
    ws.serverClose(4001); // refused before the ack: the streak grows
    await flush();
    assert.equal(calls, 3);
    assert.equal(client.counters.lastRetryMs, 200);
    mock.timers.tick(200);
    assert.equal(FakeSocket.all.length, 3);
    assert.ok(!states.includes("unauthorized"), "never stuck waiting for setToken");
    client.close();
  } finally {
    mock.timers.reset();
  }
});
