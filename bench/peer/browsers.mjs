// Browsers for the browsers scenario (bench/s7_browsers.py): many SSE readers, each an HTTP
// connection like a chat page's, against stream-relay's gateway or the peer's server alike.
// Driven over stdin/stdout JSON lines by the bench:
//
//   {"cmd":"open", "base":"127.0.0.1:P", "system":"relay"|"peer", "answers":[id...],
//    "readers":R, "count":C, "rate":r, "ramp_s":s}
//      POSTs each answer (spread over ramp_s seconds); once a POST's response has begun, R - 1
//      more readers resume it (GET /api/chat/<id>/stream). Emits "opened" when every reader's
//      response has begun, "done" when all have ended, each reader having received the deltas
//      1..C in order and then [DONE] (any gap, duplicate or early end is an "error").
//   {"cmd":"pending"}  emits "pending": what the first 20 readers still reading have received
//   {"cmd":"mark"}     starts a measuring window
//   {"cmd":"measure"}  emits "window": a histogram (0.1 ms buckets) of the latencies of the
//                      deltas received in it, from the model's stamp to here, their count and
//                      max, and the window's length as this process saw it
//
// Deltas are {"type":"text-delta",...,"delta":"<seq>:<us>"}, stamped by bench/peer/model.mjs on
// the bench's CLOCK_MONOTONIC epoch (BENCH_EPOCH_NS), which process.hrtime shares.

import http from "node:http";
import readline from "node:readline";

const epoch = BigInt(process.env.BENCH_EPOCH_NS ?? "0");
const nowUs = () => Number((process.hrtime.bigint() - epoch) / 1000n);
const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
const emit = (event, fields = {}) => process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
const DELTA = '"delta":"';

function fail(message) {
  emit("error", { message });
  process.exit(2);
}

// The window's latencies, in 0.1 ms buckets (the bench merges the processes' histograms).
const BUCKET_US = 100;
let window = null; // {buckets: Map<bucket, count>, count, maxUs, began}
function record(latencyUs) {
  if (window === null) return;
  const bucket = Math.max(0, Math.floor(latencyUs / BUCKET_US));
  window.buckets.set(bucket, (window.buckets.get(bucket) ?? 0) + 1);
  window.count += 1;
  if (latencyUs > window.maxUs) window.maxUs = latencyUs;
}

// One reader: its SSE body, checked delta by delta. Resolves at [DONE] and the body's end.
const following = new Map(); // label -> () => what it has received, while it reads

function follow(response, label, count) {
  return new Promise((resolve) => {
    response.setEncoding("latin1");
    let carry = "";
    let expected = 1;
    let done = false;
    following.set(label, () => `${label}: ${expected - 1} of ${count} deltas, [DONE] ${done}`);
    response.on("data", (piece) => {
      const now = nowUs();
      const text = carry + piece;
      let at = 0;
      for (;;) {
        const end = text.indexOf("\n\n", at);
        if (end < 0) break;
        const delta = text.indexOf(DELTA, at);
        if (delta >= 0 && delta < end) {
          const colon = text.indexOf(":", delta + DELTA.length);
          const seq = Number(text.slice(delta + DELTA.length, colon));
          if (seq !== expected) fail(`${label}: delta ${seq} where ${expected} was due`);
          expected += 1;
          record(now - Number(text.slice(colon + 1, text.indexOf('"', colon))));
        } else if (text.startsWith("data: [DONE]", text.indexOf("data: ", at))) {
          done = true;
        }
        at = end + 2;
      }
      carry = text.slice(at);
    });
    response.on("end", () => {
      following.delete(label);
      if (!done || expected !== count + 1) {
        fail(`${label}: ended after ${expected - 1} of ${count} deltas, [DONE] ${done}`);
      }
      resolve();
    });
    response.on("error", (error) => fail(`${label}: ${error}`));
  });
}

function request(base, method, path, body) {
  const [host, port] = [base.slice(0, base.lastIndexOf(":")), Number(base.slice(base.lastIndexOf(":") + 1))];
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const headers = payload === undefined ? {} : {
      "content-type": "application/json",
      "content-length": Buffer.byteLength(payload),
    };
    const sent = http.request({ host, port, method, path, agent, headers }, resolve);
    sent.on("error", reject);
    sent.end(payload);
  });
}

function chatBody(system, id, count, rate) {
  if (system === "peer") return { id, count, rate };
  return {
    id,
    trigger: "submit-message",
    messages: [{ id: "u1", role: "user", parts: [{ type: "text", text: "go" }] }],
    producer: "model",
    options: { count: String(count), rate: String(rate) },
  };
}

async function open({ base, system, answers, readers, count, rate, ramp_s: rampS }) {
  const resumePath = (id) =>
    `/api/chat/${encodeURIComponent(id)}/stream${system === "relay" ? "?replay=exact" : ""}`;
  const began = performance.now();
  const following = [];
  const started = answers.map(async (id, i) => {
    const due = began + (rampS * 1000 * i) / answers.length;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    const response = await request(base, "POST", "/api/chat", chatBody(system, id, count, rate));
    if (response.statusCode !== 200) fail(`POST ${id}: ${response.statusCode}`);
    following.push(follow(response, `${id}/0`, count));
    await Promise.all(
      Array.from({ length: readers - 1 }, async (_, k) => {
        const resumed = await request(base, "GET", resumePath(id));
        if (resumed.statusCode !== 200) fail(`GET ${id}: ${resumed.statusCode}`);
        following.push(follow(resumed, `${id}/${k + 1}`, count));
      }),
    );
  });
  await Promise.all(started);
  emit("opened", { answers: answers.length, readers: following.length });
  await Promise.all(following);
  emit("done", { readers: following.length });
}

const handlers = {
  open: (args) => open(args).catch((error) => fail(String(error?.stack ?? error))),
  pending: () => emit("pending", { readers: [...following.values()].slice(0, 20).map((f) => f()) }),
  mark: () => {
    window = { buckets: new Map(), count: 0, maxUs: 0, began: performance.now() };
  },
  measure: () => {
    const { buckets, count, maxUs, began } = window ?? {
      buckets: new Map(), count: 0, maxUs: 0, began: performance.now(),
    };
    window = null;
    emit("window", {
      samples: count, bucket_us: BUCKET_US, max_us: maxUs, buckets: [...buckets],
      seconds: (performance.now() - began) / 1000,
    });
  },
};

process.on("unhandledRejection", (error) => fail(String(error?.stack ?? error)));
const lines = readline.createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const { cmd, ...args } = JSON.parse(line);
  if (cmd === "exit") process.exit(0);
  if (!handlers[cmd]) fail(`unknown command ${cmd}`);
  handlers[cmd](args);
});
lines.on("close", () => process.exit(0));
emit("listening");
