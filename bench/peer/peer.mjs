// The peer: Vercel's resumable-stream on Redis, through its documented API only
// (createResumableStreamContext, createNewResumableStream, resumeExistingStream).
//
//   node bench/peer/peer.mjs producer     # the processes that make answers (an API route's POST)
//   node bench/peer/peer.mjs reader       # the processes that resume and follow them (its GET)
//
// Driven by bench.run over stdin/stdout JSON lines, like the Python workers. REDIS_URL names the
// Redis; BENCH_EPOCH_NS is the bench's CLOCK_MONOTONIC epoch (process.hrtime is that clock).
// Chunks are 40-byte strings "<seq:12>:<us:14>:............" stamped when the producer makes them;
// readers check every one (resumable-stream may join chunks: records are split back by size).

import { createResumableStreamContext } from "resumable-stream";
import readline from "node:readline";

const RECORD = 40;
const PAD = "............";
const epoch = BigInt(process.env.BENCH_EPOCH_NS ?? "0");
const keyPrefix = process.env.BENCH_KEY_PREFIX ?? "stream-relay-bench";
const nowUs = () => Number((process.hrtime.bigint() - epoch) / 1000n);
const record = (seq, us) =>
  `${String(seq).padStart(12, "0")}:${String(us).padStart(14, "0")}:${PAD}`;

const context = createResumableStreamContext({ waitUntil: null, keyPrefix });

const emit = (event, fields = {}) => process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class GapError extends Error {}

function percentile(sorted, q) {
  if (sorted.length === 0) return NaN;
  const position = ((sorted.length - 1) * q) / 100;
  const low = Math.floor(position);
  const high = Math.min(low + 1, sorted.length - 1);
  return sorted[low] + (sorted[high] - sorted[low]) * (position - low);
}

function summary(latencies, count) {
  const sorted = Float64Array.from(latencies.subarray(0, count)).sort();
  return {
    p50_ms: percentile(sorted, 50) / 1000,
    p99_ms: percentile(sorted, 99) / 1000,
    max_ms: count ? sorted[count - 1] / 1000 : NaN,
    samples: count,
  };
}

// --- producer ----------------------------------------------------------------------------------

function producer() {
  let gate = null; // {promise, open} for the streams created since the last go
  const batches = []; // streams per create, for "finished"
  const holds = new Map(); // id -> release of a held stream

  function newGate() {
    let open;
    const promise = new Promise((resolve) => (open = resolve));
    return { promise, open };
  }

  // The answer, as an LLM route would hand it to createNewResumableStream: one string per chunk.
  function makeStream(id, count, rate, hold, gatePromise, produced) {
    let seq = 0;
    let start = 0;
    const interval = rate > 0 ? 1000 / rate : 0;
    return () =>
      new ReadableStream({
        async pull(controller) {
          if (seq === 0) {
            await gatePromise;
            start = performance.now() + (rate > 0 ? interval * Math.random() : 0);
          }
          if (seq >= count) {
            produced();
            if (hold) await new Promise((resolve) => holds.set(id, resolve));
            controller.close();
            return;
          }
          if (rate > 0) {
            const wait = start + seq * interval - performance.now();
            if (wait > 0) await sleep(wait);
          }
          controller.enqueue(record(seq, nowUs()));
          seq += 1;
        },
      });
  }

  async function create({ ids, count, rate = 0, hold = false }) {
    gate = gate ?? newGate();
    let remaining = ids.length;
    let producedAll;
    const allProduced = new Promise((resolve) => (producedAll = resolve));
    const produced = () => {
      remaining -= 1;
      if (remaining === 0) producedAll();
    };
    const drained = [];
    for (const id of ids) {
      const stream = await context.createNewResumableStream(
        id,
        makeStream(id, count, rate, hold, gate.promise, produced),
      );
      if (stream === null) throw new Error(`stream ${id} already exists and is done`);
      // The route's own response: a client reading it (here, discarding it).
      drained.push(
        (async () => {
          const reader = stream.getReader();
          while (!(await reader.read()).done);
        })(),
      );
    }
    batches.push({ ids, allProduced, drained });
    emit("created", { streams: ids.length });
  }

  async function go() {
    const { open } = gate;
    gate = null;
    const batch = batches.at(-1);
    open();
    emit("released");
    await batch.allProduced;
    emit("produced");
    await Promise.all(batch.drained);
    emit("finished_streams");
  }

  function close({ ids }) {
    for (const id of ids) {
      holds.get(id)?.();
      holds.delete(id);
    }
  }

  return { create, go, close };
}

// --- reader ------------------------------------------------------------------------------------

function reader() {
  // Follows one resumed stream to its end, checking every record.
  async function follow(stream, count, latencies, state) {
    const reader = stream.getReader();
    let expected = 0;
    let carry = "";
    let firstStamp = -1;
    let lastReceipt = -1;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const now = nowUs();
      const text = carry + value;
      const whole = text.length - (text.length % RECORD);
      carry = text.slice(whole);
      for (let at = 0; at < whole; at += RECORD) {
        const seq = Number(text.slice(at, at + 12));
        if (seq !== expected) throw new GapError(`offset ${expected} holds chunk ${seq}`);
        const stamp = Number(text.slice(at + 13, at + 27));
        if (firstStamp < 0) firstStamp = stamp;
        latencies[state.count++] = now - stamp;
        expected += 1;
      }
      lastReceipt = now;
    }
    if (carry || expected !== count) {
      throw new GapError(`got ${expected} chunks of ${count} (${carry.length} stray bytes)`);
    }
    return { firstStamp, lastReceipt };
  }

  async function resume({ ids, count }) {
    const latencies = new Float64Array(ids.length * count);
    const state = { count: 0 };
    const streams = [];
    for (const id of ids) {
      const stream = await context.resumeExistingStream(id);
      if (!stream) throw new Error(`resumeExistingStream(${id}) gave ${stream}`);
      streams.push(stream);
    }
    const following = streams.map((s) => follow(s, count, latencies, state));
    emit("ready", { phase: "attached" });
    const results = await Promise.all(following);
    const first = Math.min(...results.map((r) => r.firstStamp));
    const last = Math.max(...results.map((r) => r.lastReceipt));
    emit("done", {
      chunks: state.count,
      seconds: (last - first) / 1e6,
      rate: state.count / ((last - first) / 1e6),
      ...summary(latencies, state.count),
    });
  }

  // Scenario 4: a new reader on an open stream; time to its first chunk and to all of them.
  async function resumeTimed({ id, count }) {
    await context.hasExistingStream(id); // the Redis connections are up before the clock starts
    const began = performance.now();
    const stream = await context.resumeExistingStream(id);
    if (!stream) throw new Error(`resumeExistingStream(${id}) gave ${stream}`);
    const reader = stream.getReader();
    // Timed: until the reader holds every chunk; each is checked right after.
    let first = 0;
    let held = 0;
    const pieces = [];
    while (held < count * RECORD) {
      const { done, value } = await reader.read();
      if (done) throw new GapError(`the stream closed after ${held / RECORD} of ${count} chunks`);
      if (!first) first = performance.now();
      pieces.push(value);
      held += value.length;
    }
    const all = performance.now();
    await reader.cancel();
    const text = pieces.join("");
    let received = 0;
    for (let at = 0; at + RECORD <= text.length; at += RECORD) {
      const seq = Number(text.slice(at, at + 12));
      if (seq !== received) throw new GapError(`offset ${received} holds chunk ${seq}`);
      received += 1;
    }
    if (received !== count || text.length !== count * RECORD) {
      throw new GapError(`got ${text.length} bytes for ${count} chunks`);
    }
    emit("done", { chunks: received, first_ms: first - began, all_ms: all - began });
  }

  return { resume, resume_timed: resumeTimed };
}

// --- main --------------------------------------------------------------------------------------

const role = process.argv[2];
const handlers = role === "producer" ? producer() : role === "reader" ? reader() : null;
if (!handlers) {
  console.error("usage: peer.mjs producer|reader");
  process.exit(64);
}

function fail(error) {
  emit("error", { gap: error instanceof GapError, message: String(error?.stack ?? error) });
  process.exit(error instanceof GapError ? 2 : 1);
}
process.on("unhandledRejection", fail);

const lines = readline.createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const { cmd, ...args } = JSON.parse(line);
  if (cmd === "exit") process.exit(0);
  const handler = handlers[cmd];
  if (!handler) return fail(new Error(`unknown command ${cmd}`));
  Promise.resolve(handler(args)).catch(fail);
});
lines.on("close", () => process.exit(0));
emit("listening");
