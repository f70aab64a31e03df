// The scenario (scenario.mjs) with Node's `ws` package, through its own API
// (`on("message" | "close" | "error")`). Prints the report as JSON.
//   node tests/interop/run_node.mjs WS_URL ADMIN_URL TOPIC_PREFIX TIMEOUT_MS
import WebSocket from "ws";

import { decodeAll, encode } from "../../engine/static/fanout.js";
import { Inbox, publisher, runScenario } from "./scenario.mjs";

const [wsUrl, adminUrl, prefix, timeoutArg] = process.argv.slice(2);
const timeoutMs = Number(timeoutArg || 10000);

function open() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl, ["fanout.v1"]);
    const inbox = new Inbox(timeoutMs);
    const errors = [];
    let wasOpen = false;
    ws.on("message", (data, isBinary) => {
      if (isBinary) inbox.push(decodeAll(new Uint8Array(data)));
    });
    ws.on("error", (err) => {
      errors.push(String(err));
      if (!wasOpen) reject(err);
    });
    const closed = new Promise((done) => {
      ws.on("close", (code) => {
        inbox.end(`close ${code}`);
        // clean: the close handshake completed and no error was reported
        done({ code, clean: errors.length === 0, errors });
      });
    });
    ws.on("open", () => {
      wasOpen = true;
      resolve({
        protocol: ws.protocol,
        send: (bytes) => ws.send(bytes),
        close: (code, reason) => ws.close(code, reason),
        next: (predicate, what) => inbox.next(predicate, what),
        closed,
      });
    });
  });
}

const report = await runScenario({ open, publish: publisher(adminUrl), encode, prefix });
process.stdout.write(JSON.stringify(report));
