// A relay.v1.RelayService client in Node.js: what a backend in another language does with the
// relay. It starts an answer, reads it, drops the connection after a few chunks (the answer goes
// on), resumes exactly after the last chunk it saw, then starts a second answer and stops it.
//
//   cd examples/client-node && npm install && node client.mjs --target 127.0.0.1:50051
//
// Flags: --target (default 127.0.0.1:50051), --chat (default a new id), --token (or
// RELAY_TOKEN: sent as `authorization: Bearer`), --subject (the x-relay-subject a token that may
// act for others names). It prints one JSON line per step, for people and for the tests.
//
// The proto is loaded at runtime from ../../protos (no code generation; for generated clients in
// Go, TypeScript or Java see buf.gen.yaml at the repository's root).

import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const definition = protoLoader.loadSync("relay/v1/relay.proto", {
  includeDirs: [path.resolve(HERE, "../../protos")],
  keepCase: true, // fields as in the proto: chat_id, from_offset, parts_json
  enums: String, // "STREAM_STATE_COMPLETED"
  longs: Number, // offsets fit a JavaScript number
  defaults: true,
  oneofs: true, // `event` names which field of a oneof is set
});
const { RelayService } = grpc.loadPackageDefinition(definition).relay.v1;

const { values: flags } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    chat: { type: "string", default: `node-${randomUUID()}` },
    token: { type: "string", default: process.env.RELAY_TOKEN ?? "" },
    subject: { type: "string", default: "" },
  },
});

const relay = new RelayService(flags.target, grpc.credentials.createInsecure());
const metadata = () => {
  const sent = new grpc.Metadata();
  if (flags.token) sent.set("authorization", `Bearer ${flags.token}`);
  if (flags.subject) sent.set("x-relay-subject", encodeURIComponent(flags.subject));
  return sent;
};
const say = (step, fields) => console.log(JSON.stringify({ step, ...fields }));

/** A unary call as a promise; a refusal rejects with the relay's status (`code`, `details`). */
const call = (method, request) =>
  new Promise((resolve, reject) =>
    relay[method](request, metadata(), { deadline: Date.now() + 10_000 }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    ),
  );

/** Reads an Attach: each chunk with its offset to `onChunk`, which may return true to drop the
 *  call (a dropped connection: only this reader ends). Resolves with the end, or null if dropped. */
function attach(request, onChunk) {
  return new Promise((resolve, reject) => {
    const stream = relay.Attach(request, metadata());
    let dropped = false;
    stream.on("data", (response) => {
      if (response.event === "end") return resolve(response.end);
      const batch = response.chunks;
      for (const [i, text] of batch.chunks.entries()) {
        // A compacted replay says which offset each chunk stands for; else they count up.
        const offset = batch.offsets.length ? batch.offsets[i] : batch.first_offset + i;
        if (!dropped && onChunk(JSON.parse(text), offset)) {
          dropped = true;
          stream.cancel();
          return resolve(null);
        }
      }
    });
    stream.on("error", (error) => (dropped ? undefined : reject(error)));
  });
}

const user = (id, text) => ({
  id,
  role: "ROLE_USER",
  parts_json: JSON.stringify([{ type: "text", text }]),
});

try {
  const started = await call("Start", {
    chat_id: flags.chat,
    messages: [user("u1", "hello from node")],
    options: { chunks: "40", delay_ms: "10" },
  });
  say("started", { streamId: started.stream_id });

  let seen = 0;
  let text = "";
  const collect = (chunk) => {
    if (chunk.type === "text-delta") text += chunk.delta;
  };
  await attach({ stream_id: started.stream_id, from_offset: 0, max_batch: 1 }, (chunk, offset) => {
    collect(chunk);
    seen = offset + 1;
    return seen === 5; // the connection drops here; the answer goes on
  });
  say("dropped", { after: seen });

  // Resume exactly after the last chunk seen: this client keeps what it has (EXACT replay).
  const end = await attach(
    { stream_id: started.stream_id, from_offset: seen, replay: "REPLAY_MODE_EXACT" },
    (chunk) => collect(chunk),
  );
  say("ended", { state: end.state, finalOffset: end.final_offset, text });

  const second = await call("Start", {
    chat_id: flags.chat,
    messages: [user("u2", "and again")],
    options: { chunks: "1000", delay_ms: "10" },
  });
  // Read it a little (the user sees the answer begin), then the explicit Stop.
  await attach({ stream_id: second.stream_id, from_offset: 0 }, (_, offset) => offset === 3);
  const stopped = await call("Stop", { chat_id: flags.chat, stream_id: second.stream_id });
  say("stopped", {
    outcome: stopped.outcome,
    state: stopped.end?.state,
    reason: stopped.end?.reason,
    finalOffset: stopped.end?.final_offset,
  });

  // A refusal comes back as the relay's status.
  try {
    await call("GetActive", { chat_id: "not a chat id" });
  } catch (error) {
    say("refused", { code: grpc.status[error.code], details: error.details });
  }
} finally {
  relay.close();
}
