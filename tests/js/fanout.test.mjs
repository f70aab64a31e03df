// Unit tests of engine/static/fanout.js: the msgpack codec, the state view,
// the reconnect policy, and the client driven by a fake WebSocket and mocked
// timers (no network, no sleeps). Run by tests/unit/test_fanout_js.py
// (`node --test`), which also passes msgpack fixtures made by Python's msgpack.
import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { decode, decodeAll, encode, Ext, StateView, Reconnector, FanoutClient } from "../../engine/static/fanout.js";

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
  close(code = 1000) { this.serverClose(code); }
  open() { this.readyState = 1; this.recv({ op: "hello", v: 1, conn: "c", node: "n", auth: false }); }
  recv(...msgs) { this.onmessage({ data: msgs.map((m) => encode(m)).reduce((a, b) => new Uint8Array([...a, ...b])).buffer }); }
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
