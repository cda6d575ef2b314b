// The simulated model for the browsers scenario (bench/s7_browsers.py): a relay.v1.ProducerService
// in its own process, so neither system under test pays for making the tokens.
//
//   node bench/peer/model.mjs            # prints {"event":"listening","address":"127.0.0.1:P"}
//
// Generate streams, at `rate` chunks/s, a text-start and then `count` text deltas
// {"type":"text-delta","id":"t0","delta":"<seq>:<us>"}: seq is the chunk's offset in the answer
// and us the microseconds since the bench epoch (BENCH_EPOCH_NS, CLOCK_MONOTONIC) when it was
// made. Streams start at a random phase, so a thousand of them do not tick in lockstep; each
// response carries what is due (one chunk at these rates). Both stream-relay (a `grpc` producer
// profile) and the peer's HTTP server (bench/peer/server.mjs, as a route calls its model API)
// read their answers from this process. A cancelled call stops at once.
//
// GenerateMany (the relay's `multiplex = true` profiles) makes the same answers, all of a call's
// answers in one response every BENCH_MODEL_TICK_MS (default 10) holding the chunks that fell due
// since the last: each stamped with the time it fell due, so its wait for the tick counts in the
// latency the browsers measure.

import { setTimeout as sleep } from "node:timers/promises";

import { grpc, relay } from "./producer_proto.mjs";

const epoch = BigInt(process.env.BENCH_EPOCH_NS ?? "0");
const nowUs = () => Number((process.hrtime.bigint() - epoch) / 1000n);


function number(options, key, fallback) {
  const value = Number(options[key] ?? fallback);
  if (!Number.isFinite(value) || value < 0) throw new Error(`option ${key} must be a number >= 0`);
  return value;
}

async function generate(call) {
  let cancelled = false;
  call.on("cancelled", () => (cancelled = true));
  let count;
  let rate;
  try {
    count = number(call.request.options, "count", 1000);
    rate = number(call.request.options, "rate", 50);
  } catch (error) {
    call.destroy({ code: grpc.status.INVALID_ARGUMENT, details: String(error.message) });
    return;
  }
  const interval = rate > 0 ? 1000 / rate : 0;
  const start = performance.now() + interval * Math.random();
  call.write({ chunks: ['{"type":"text-start","id":"t0"}'] });
  for (let seq = 1; seq <= count && !cancelled; seq++) {
    if (interval) {
      const wait = start + seq * interval - performance.now();
      if (wait > 0) await sleep(wait);
      if (cancelled) break;
    }
    const chunk = `{"type":"text-delta","id":"t0","delta":"${seq}:${nowUs()}"}`;
    if (!call.write({ chunks: [chunk] })) await new Promise((resolve) => call.once("drain", resolve));
  }
  if (!cancelled) call.end();
}

const TICK_MS = Number(process.env.BENCH_MODEL_TICK_MS ?? "10");
const usAt = (performanceMs) => nowUs() - Math.round((performance.now() - performanceMs) * 1000);

function generateMany(call) {
  const answers = new Map(); // stream id -> {count, interval, start, seq}
  let ended = false;
  call.on("data", (request) => {
    if (request.cancel) {
      answers.delete(request.cancel);
      return;
    }
    const { stream_id: id, options } = request.start;
    const count = number(options, "count", 1000);
    const rate = number(options, "rate", 50);
    const interval = rate > 0 ? 1000 / rate : 0;
    answers.set(id, { count, interval, start: performance.now() + interval * Math.random(), seq: 0 });
  });
  const finish = () => {
    ended = true;
    clearInterval(timer);
  };
  call.on("end", () => {
    finish();
    call.end();
  });
  call.on("cancelled", finish);
  call.on("error", finish);
  const timer = setInterval(() => {
    if (ended || answers.size === 0) return;
    const now = performance.now();
    const streams = [];
    for (const [id, answer] of answers) {
      const chunks = [];
      if (answer.seq === 0) {
        chunks.push('{"type":"text-start","id":"t0"}');
        answer.seq = 1;
      }
      while (answer.seq <= answer.count) {
        const due = answer.interval ? answer.start + answer.seq * answer.interval : now;
        if (due > now) break;
        chunks.push(`{"type":"text-delta","id":"t0","delta":"${answer.seq}:${usAt(due)}"}`);
        answer.seq += 1;
      }
      const done = answer.seq > answer.count;
      if (chunks.length || done) streams.push(done ? { stream_id: id, chunks, end: { code: 0 } } : { stream_id: id, chunks });
      if (done) answers.delete(id);
    }
    if (streams.length) call.write({ streams });
  }, TICK_MS);
}

const server = new grpc.Server();
server.addService(relay.ProducerService.service, { Generate: generate, GenerateMany: generateMany });
server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, port) => {
  if (error) {
    console.error(String(error));
    process.exit(1);
  }
  process.stdout.write(JSON.stringify({ event: "listening", address: `127.0.0.1:${port}` }) + "\n");
});
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
