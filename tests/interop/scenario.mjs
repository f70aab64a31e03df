// The user's view of fanout, run by every independent client stack (Node's `ws`,
// Chromium's WebSocket; tests/interop/test_python_websockets.py is the same in
// Python). No imports: each stack passes in its own pieces.
//
//   open()           -> a connection: { protocol, send(bytes), close(code?, reason?),
//                       next(predicate, what) -> the next message matching it,
//                       closed -> Promise<{ code, clean, errors }> }
//   publish(items)   -> the positions POST /publish answered
//   encode, decodeAll: msgpack (engine/static/fanout.js's codec)
//
// Steps (docs/protocol.md sections 2-4): subscribe a state topic and a stream
// topic, receive their snapshots and one live update each, close without a
// status code (what `ws.close()` does), miss updates while away, reconnect
// with `since` and receive exactly what was missed, close with 1000, then
// with an application code (4000). The report is checked in Python
// (tests/interop/conftest.py: check_report).

export async function runScenario({ open, publish, encode, prefix }) {
  const S = `${prefix}.s`;
  const EV = `${prefix}.ev`;
  const report = { published: {} };
  const state = (msg) => ({ full: msg.full, items: msg.items, pos: msg.pos, epoch: msg.epoch });

  report.published.initial = await publish([
    { topic: S, key: "a", data: 1 },
    { topic: S, key: "b", data: 1 },
    { topic: EV, data: "e1" },
    { topic: EV, data: "e2" },
  ]);

  // 1. subscribe, snapshots, live updates, close without a status code
  let conn = await open();
  report.protocol = conn.protocol;
  const hello = await conn.next((m) => m.op === "hello", "hello");
  report.hello = { op: hello.op, v: hello.v };
  conn.send(encode({ op: "sub", topics: [S, EV], id: 1 }));
  report.ack = (await conn.next((m) => m.op === "ack" && m.id === 1, "ack")).op;
  report.snap_state = state(await conn.next((m) => m.op === "snap" && m.topic === S, "snap S"));
  report.snap_stream = state(await conn.next((m) => m.op === "snap" && m.topic === EV, "snap EV"));
  report.published.live = await publish([
    { topic: S, key: "a", data: 2 },
    { topic: EV, data: "e3" },
  ]);
  const upd = await conn.next((m) => m.op === "upd" && m.topic === S, "upd");
  report.upd = { items: upd.items, pos: upd.pos };
  const evt = await conn.next((m) => m.op === "evt" && m.topic === EV, "evt");
  report.evt = { items: evt.items };
  conn.close(); // no status code: an empty close frame (RFC 6455 section 5.5.1)
  report.close_empty = await conn.closed;

  // 2. missed while away
  report.published.missed = await publish([
    { topic: S, key: "a", data: 3 },
    { topic: S, key: "c", data: 1 },
    { topic: EV, data: "e4" },
    { topic: EV, data: "e5" },
  ]);

  // 3. reconnect with `since`: only what was missed
  conn = await open();
  await conn.next((m) => m.op === "hello", "hello");
  const lastEvent = evt.items[evt.items.length - 1][0];
  conn.send(
    encode({
      op: "sub",
      topics: [S, EV],
      id: 2,
      since: { [S]: [report.snap_state.epoch, upd.pos], [EV]: [report.snap_stream.epoch, lastEvent] },
    }),
  );
  report.resnap_state = state(await conn.next((m) => m.op === "snap" && m.topic === S, "resnap S"));
  report.resnap_stream = state(await conn.next((m) => m.op === "snap" && m.topic === EV, "resnap EV"));
  conn.close(1000, "done");
  report.close_1000 = await conn.closed;

  // 4. an application close code is echoed
  conn = await open();
  await conn.next((m) => m.op === "hello", "hello");
  conn.close(4000, "app");
  report.close_4000 = await conn.closed;
  return report;
}

/** A message queue for an adapter: push decoded messages, await the next match. */
export class Inbox {
  constructor(timeoutMs) {
    this.timeoutMs = timeoutMs;
    this.messages = [];
    this.waiters = [];
    this.ended = null;
  }

  push(messages) {
    this.messages.push(...messages);
    this.wake();
  }

  end(reason) {
    this.ended = reason;
    this.wake();
  }

  wake() {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }

  async next(predicate, what) {
    const deadline = Date.now() + this.timeoutMs;
    for (;;) {
      const i = this.messages.findIndex(predicate);
      if (i >= 0) return this.messages.splice(i, 1)[0];
      if (this.ended) throw new Error(`waiting for ${what}: connection ended (${this.ended})`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`waiting for ${what}: timed out`);
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => { clearTimeout(t); resolve(); });
      });
    }
  }
}

/** POST /publish on the admin port; the positions it answered. */
export function publisher(adminUrl) {
  return async (items) => {
    const resp = await fetch(`${adminUrl}/publish`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ items }),
    });
    const body = await resp.json();
    if (resp.status !== 200) throw new Error(`POST /publish: ${resp.status} ${JSON.stringify(body)}`);
    return body.pos;
  };
}
