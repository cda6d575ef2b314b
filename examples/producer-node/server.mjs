// A relay.v1.ProducerService in Node.js: the relay's `grpc` producer kind, implemented.
//
// It streams "Node producer says: <the last user message>" one word per text delta, framed by
// start / start-step / text-start ... text-end / finish-step / finish, as AI SDK UI message chunks.
// Options: `delay_ms` (pause before each text delta, as a model would, default 30) and `chunks`
// (number of text deltas; the words repeat to fill it). Other options are INVALID_ARGUMENT.
//
// Batching: a GenerateResponse carries every chunk made since the last one was sent (up to
// BATCH_MAX_CHUNKS chunks or BATCH_MAX_CHARS characters), so a fast answer (`delay_ms` 0) goes in a
// few large responses, and a paced one in one response per pause.
//
// When the relay cancels the call (the user pressed Stop, a new answer superseded this one, the
// relay shut down), grpc-js emits 'cancelled' on the call: the loop stops at once and the server
// prints `cancelled <stream_id>`. A real backend would abort its model request there.
//
// GenerateMany (a profile with `multiplex = true`): many answers on one call. Each `start` runs
// the same answer, putting its chunks in a shared outbox; one writer sends, every tick
// (`--tick-ms`, default 10: a chunk waits at most that long), one response holding every answer's
// ready chunks, and an answer's end (code 0, or INVALID_ARGUMENT for options it refuses) after its
// last chunks. A `cancel` stops that answer (`cancelled <stream_id>`) and drops what it had ready.
//
//   cd examples/producer-node && npm install && node server.mjs --port 50062
//
// Beyond loopback it needs a token, and should have TLS (mutual TLS with --tls-client-ca):
//
//   PRODUCER_TOKEN=<secret> node server.mjs --host 0.0.0.0 --tls-cert producer.pem \
//     --tls-key producer-key.pem [--tls-client-ca relay-ca.pem]
//
// Flags: --token (or PRODUCER_TOKEN; required unless --host is loopback: every call must send
// `authorization: Bearer <token>`, else UNAUTHENTICATED), --tls-cert and --tls-key (or
// PRODUCER_TLS_CERT, PRODUCER_TLS_KEY), --tls-client-ca (or PRODUCER_TLS_CLIENT_CA: client
// certificates required and checked). The relay's profile names them as token_env, tls_ca,
// tls_cert, tls_key (see examples/producer_python.py).
//
// The proto is loaded at runtime from ../../protos (no code generation).

import { createHash, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import { setImmediate as nextTurn, setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.resolve(HERE, "../../protos");
const DEFAULT_DELAY_MS = 30;
const BATCH_MAX_CHUNKS = 500; // chunks per GenerateResponse at most
const BATCH_MAX_CHARS = 64 * 1024; // and about this much JSON: far below the relay's 64 MiB limit
const OPTIONS = { delay_ms: [0, 60_000], chunks: [1, 1_000_000] };
const MANY_MAX_CHARS = 1 << 20; // GenerateMany: about this much JSON per response at most
const MANY_BACKLOG_CHUNKS = 20_000; // GenerateMany: fast answers wait while the outbox holds this many

const definition = protoLoader.loadSync("relay/v1/producer.proto", {
  includeDirs: [PROTOS],
  keepCase: true, // fields as in the proto: chat_id, stream_id, parts_json
  enums: String, // role: "ROLE_USER"
  defaults: true,
});
const relay = grpc.loadPackageDefinition(definition).relay.v1;

function parseOptions(options) {
  const unknown = Object.keys(options).filter((key) => !(key in OPTIONS)).sort();
  if (unknown.length) {
    throw new Error(`unknown options ${JSON.stringify(unknown)}; known: ${JSON.stringify(Object.keys(OPTIONS).sort())}`);
  }
  const values = {};
  for (const [key, [low, high]] of Object.entries(OPTIONS)) {
    if (!(key in options)) continue;
    const value = Number(options[key]);
    if (options[key].trim() === "" || Number.isNaN(value)) {
      throw new Error(`${key} must be a number, got ${JSON.stringify(options[key])}`);
    }
    if (value < low || value > high) throw new Error(`${key} must be between ${low} and ${high}`);
    values[key] = value;
  }
  return { delayMs: values.delay_ms ?? DEFAULT_DELAY_MS, count: values.chunks };
}

function answerWords(messages) {
  let text = "";
  for (const message of [...messages].reverse()) {
    if (message.role === "ROLE_USER") {
      const parts = JSON.parse(message.parts_json || "[]");
      text = parts.filter((p) => p.type === "text").map((p) => String(p.text ?? "")).join(" ");
      break;
    }
  }
  return `Node producer says: ${text.trim() || "nothing"}`.split(/\s+/);
}

// The answer as the model makes it: the framing chunks at once, then one text delta at a time,
// then the closing chunks at once.
function* script(streamId, words, count = words.length) {
  const chunk = (value) => JSON.stringify(value);
  yield [
    chunk({ type: "start", messageId: `msg_${streamId}` }),
    chunk({ type: "start-step" }),
    chunk({ type: "text-start", id: "t0" }),
  ];
  for (let i = 0; i < count; i++) {
    const delta = words[i % words.length] + (i < count - 1 ? " " : "");
    yield [chunk({ type: "text-delta", id: "t0", delta })];
  }
  yield [
    chunk({ type: "text-end", id: "t0" }),
    chunk({ type: "finish-step" }),
    chunk({ type: "finish", finishReason: "stop" }),
  ];
}

async function generate(call) {
  const { stream_id: streamId, messages, options } = call.request;
  const cancelled = new AbortController();
  let settled = false; // grpc-js also emits 'cancelled' after the call ended normally: ignore that
  const finish = (end) => {
    settled = true;
    end();
  };
  call.on("cancelled", () => {
    if (settled) return;
    settled = true;
    cancelled.abort();
    console.log(`cancelled ${streamId}`);
  });
  console.log(`generate ${streamId}`);
  let settings;
  try {
    settings = parseOptions(options);
  } catch (error) {
    finish(() => call.emit("error", { code: grpc.status.INVALID_ARGUMENT, details: error.message }));
    return;
  }
  let responses = 0;
  let sent = 0;
  let ready = []; // chunks made, not sent yet
  let readyChars = 0;
  // One GenerateResponse with what is ready, if anything is.
  const send = async () => {
    if (!ready.length) return;
    const chunks = ready;
    ready = [];
    readyChars = 0;
    responses += 1;
    sent += chunks.length;
    if (!call.write({ chunks })) {
      // Backpressure: wait until the relay reads, or until the call is cancelled.
      await new Promise((resolve) => {
        call.once("drain", resolve);
        cancelled.signal.addEventListener("abort", resolve, { once: true });
      });
    } else {
      await nextTurn(); // let I/O (a cancellation) in between responses
    }
  };
  try {
    for (const made of script(streamId, answerWords(messages), settings.count)) {
      if (settings.delayMs) {
        // The model pauses before its next chunks: send what is ready first.
        await send();
        await sleep(settings.delayMs, undefined, { signal: cancelled.signal });
      }
      if (cancelled.signal.aborted) return;
      ready.push(...made);
      readyChars += made.reduce((total, chunk) => total + chunk.length, 0);
      if (ready.length >= BATCH_MAX_CHUNKS || readyChars >= BATCH_MAX_CHARS) await send();
    }
    await send();
    if (cancelled.signal.aborted) return;
    finish(() => call.end());
    console.log(`done ${streamId}: ${sent} chunks in ${responses} responses`);
  } catch (error) {
    if (cancelled.signal.aborted) return; // the sleep was interrupted by the cancellation
    const details = String(error?.message ?? error);
    finish(() => call.emit("error", { code: grpc.status.INTERNAL, details }));
  }
}

// GenerateMany: the answers as async loops putting their chunks in `outbox`; `flush`, every tick,
// is the one writer.
function generateMany(call, tickMs) {
  const answers = new Map(); // stream id -> AbortController, while the answer runs
  const outbox = new Map(); // stream id -> { chunks, end }: ready to send, in the order they came
  const stats = new Map(); // stream id -> { responses, sent }
  let backlog = 0; // chunks in outbox
  let roomWaiters = []; // fast answers waiting for the backlog to shrink
  let timer = null;
  let writable = true;
  let readingDone = false;
  let over = false;

  const schedule = () => {
    if (!timer && !over) timer = setTimeout(flush, tickMs);
  };
  const put = (streamId, chunks, end) => {
    let out = outbox.get(streamId);
    if (!out) outbox.set(streamId, (out = { chunks: [], end: null }));
    out.chunks.push(...chunks);
    if (end) out.end = end;
    backlog += chunks.length;
    schedule();
  };
  const room = (signal) =>
    new Promise((resolve) => {
      roomWaiters.push(resolve);
      signal.addEventListener("abort", resolve, { once: true });
    });
  const finishIfDone = () => {
    if (!over && readingDone && !answers.size && !outbox.size) {
      over = true;
      call.end();
    }
  };
  function flush() {
    timer = null;
    if (over || !writable) return;
    while (outbox.size && writable) {
      const streams = [];
      let chars = 0;
      for (const [streamId, out] of outbox) {
        const chunks = out.chunks.splice(0, BATCH_MAX_CHUNKS);
        const part = { stream_id: streamId, chunks };
        const stat = stats.get(streamId);
        stat.responses += 1;
        stat.sent += chunks.length;
        if (!out.chunks.length) {
          outbox.delete(streamId);
          if (out.end) {
            part.end = out.end;
            console.log(`done ${streamId}: ${stat.sent} chunks in ${stat.responses} responses`);
          }
        }
        streams.push(part);
        backlog -= chunks.length;
        chars += chunks.reduce((total, chunk) => total + chunk.length, 0);
        if (chars >= MANY_MAX_CHARS) break;
      }
      writable = call.write({ streams });
    }
    if (!writable) {
      call.once("drain", () => {
        writable = true;
        flush();
      });
    }
    if (backlog < MANY_BACKLOG_CHUNKS) {
      const waiters = roomWaiters;
      roomWaiters = [];
      for (const resolve of waiters) resolve();
    }
    finishIfDone();
  }

  async function answer(request, signal) {
    const streamId = request.stream_id;
    let settings;
    try {
      settings = parseOptions(request.options);
    } catch (error) {
      put(streamId, [], { code: grpc.status.INVALID_ARGUMENT, message: error.message });
      return;
    }
    try {
      for (const made of script(streamId, answerWords(request.messages), settings.count)) {
        if (settings.delayMs) {
          await sleep(settings.delayMs, undefined, { signal }); // the model thinks
        } else if (backlog >= MANY_BACKLOG_CHUNKS) {
          await room(signal); // a fast answer waits for the writer
        }
        if (signal.aborted) return;
        put(streamId, made, null);
      }
      put(streamId, [], { code: grpc.status.OK, message: "" });
    } catch (error) {
      if (signal.aborted) return; // the sleep was interrupted by the cancellation
      put(streamId, [], { code: grpc.status.INTERNAL, message: String(error?.message ?? error) });
    }
  }

  call.on("data", (request) => {
    if (request.start) {
      const streamId = request.start.stream_id;
      const cancelled = new AbortController();
      answers.set(streamId, cancelled);
      stats.set(streamId, { responses: 0, sent: 0 });
      console.log(`generate ${streamId} (GenerateMany)`);
      answer(request.start, cancelled.signal).finally(() => {
        answers.delete(streamId);
        finishIfDone();
      });
    } else if (request.cancel) {
      const cancelled = answers.get(request.cancel);
      if (cancelled) {
        cancelled.abort();
        console.log(`cancelled ${request.cancel}`);
      }
      const dropped = outbox.get(request.cancel);
      if (dropped) {
        outbox.delete(request.cancel); // nothing more for it
        backlog -= dropped.chunks.length;
      }
    }
  });
  call.on("end", () => {
    readingDone = true; // the relay is done writing: end once every answer has
    finishIfDone();
  });
  call.on("cancelled", () => {
    if (over) return;
    over = true;
    clearTimeout(timer);
    for (const [streamId, cancelled] of answers) {
      cancelled.abort();
      console.log(`cancelled ${streamId}`);
    }
  });
}

const env = process.env;
const { values: args } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "50062" },
    token: { type: "string", default: env.PRODUCER_TOKEN ?? "" },
    "tls-cert": { type: "string", default: env.PRODUCER_TLS_CERT ?? "" },
    "tls-key": { type: "string", default: env.PRODUCER_TLS_KEY ?? "" },
    "tls-client-ca": { type: "string", default: env.PRODUCER_TLS_CLIENT_CA ?? "" },
    "tick-ms": { type: "string", default: "10" },
  },
});

function fail(message) {
  console.error(`producer-node: ${message}`);
  process.exit(1);
}

if (!args.token && !["127.0.0.1", "::1", "localhost"].includes(args.host)) {
  fail("listening beyond loopback needs a token (--token or PRODUCER_TOKEN)");
}

// Digests compared in constant time: timing tells a caller nothing about the token.
const digest = (text) => createHash("sha256").update(text).digest();
const tokenDigest = args.token ? digest(args.token) : null;

function authorized(call) {
  if (!tokenDigest) return true;
  const [presented = ""] = call.metadata.get("authorization");
  const [scheme, ...rest] = String(presented).split(" ");
  return scheme.toLowerCase() === "bearer" && timingSafeEqual(digest(rest.join(" ")), tokenDigest);
}

function credentials() {
  const { "tls-cert": cert, "tls-key": key, "tls-client-ca": clientCa } = args;
  if (!cert && !key && !clientCa) return grpc.ServerCredentials.createInsecure();
  if (!cert || !key) fail("TLS needs both --tls-cert and --tls-key");
  try {
    const ca = clientCa ? readFileSync(clientCa) : null;
    const pair = { private_key: readFileSync(key), cert_chain: readFileSync(cert) };
    return grpc.ServerCredentials.createSsl(ca, [pair], Boolean(ca));
  } catch (error) {
    fail(`cannot use the TLS files: ${error.message}`);
  }
}

const server = new grpc.Server();
server.addService(relay.ProducerService.service, {
  Generate: (call) => {
    if (!authorized(call)) {
      call.emit("error", { code: grpc.status.UNAUTHENTICATED, details: "a valid token is required" });
      return;
    }
    generate(call);
  },
  GenerateMany: (call) => {
    if (!authorized(call)) {
      call.emit("error", { code: grpc.status.UNAUTHENTICATED, details: "a valid token is required" });
      return;
    }
    generateMany(call, Number(args["tick-ms"]));
  },
});
server.bindAsync(`${args.host}:${args.port}`, credentials(), (error, port) => {
  if (error) {
    console.error(`cannot listen on ${args.host}:${args.port}: ${error.message}`);
    process.exit(1);
  }
  console.log(`listening on ${args.host}:${port}`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    server.tryShutdown(() => process.exit(0));
    setTimeout(() => server.forceShutdown(), 5_000).unref();
  });
}
