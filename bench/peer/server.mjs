// The peer as its users run it, for the browsers scenario (bench/s7_browsers.py): a Node HTTP
// server with the two routes of an AI SDK chat app that resumes streams with Vercel's
// resumable-stream on Redis.
//
//   node bench/peer/server.mjs <model host:port>   # prints {"event":"listening","address":...}
//
// POST /api/chat {"id", "count", "rate"}: the route calls its model (bench/peer/model.mjs, over
// gRPC, as a route calls a model API), turns each chunk into an SSE event (`data: <chunk>`, then
// `data: [DONE]`, the UI message stream's framing) and answers with
// createNewResumableStream(id, ...), which keeps the stream resumable in Redis.
// GET /api/chat/<id>/stream: resumeExistingStream(id) as SSE (204 when there is none).
// REDIS_URL names the Redis; BENCH_KEY_PREFIX the keys' prefix.

import http from "node:http";

import { grpc, relay } from "./producer_proto.mjs";
import { createResumableStreamContext } from "resumable-stream";

const model = new relay.ProducerService(process.argv[2], grpc.credentials.createInsecure());
const context = createResumableStreamContext({
  waitUntil: null,
  keyPrefix: process.env.BENCH_KEY_PREFIX ?? "stream-relay-bench",
});
const SSE_HEADERS = {
  "content-type": "text/event-stream",
  "cache-control": "no-cache",
  "x-vercel-ai-ui-message-stream": "v1",
};

function modelStream(id, count, rate) {
  return new ReadableStream({
    start(controller) {
      const call = model.Generate({ chat_id: id, stream_id: id, messages: [], options: {
        count: String(count),
        rate: String(rate),
      } });
      call.on("data", (response) => {
        for (const chunk of response.chunks) controller.enqueue(`data: ${chunk}\n\n`);
      });
      call.on("end", () => {
        controller.enqueue("data: [DONE]\n\n");
        controller.close();
      });
      call.on("error", (error) => controller.error(error));
    },
  });
}

async function send(response, stream) {
  response.writeHead(200, SSE_HEADERS);
  const reader = stream.getReader();
  response.on("close", () => reader.cancel().catch(() => {}));
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    response.write(value);
  }
  response.end();
}

async function readJson(request) {
  const pieces = [];
  for await (const piece of request) pieces.push(piece);
  return JSON.parse(Buffer.concat(pieces).toString());
}

async function handle(request, response) {
  const resume = request.url.match(/^\/api\/chat\/([^/]+)\/stream/);
  if (request.method === "POST" && request.url === "/api/chat") {
    const { id, count, rate } = await readJson(request);
    const stream = await context.createNewResumableStream(id, () => modelStream(id, count, rate));
    if (!stream) {
      response.writeHead(409).end();
      return;
    }
    await send(response, stream);
  } else if (request.method === "GET" && resume) {
    const stream = await context.resumeExistingStream(decodeURIComponent(resume[1]));
    if (!stream) {
      response.writeHead(204).end();
      return;
    }
    await send(response, stream);
  } else {
    response.writeHead(404).end();
  }
}

const server = http.createServer((request, response) => {
  handle(request, response).catch((error) => {
    console.error(String(error?.stack ?? error));
    if (!response.headersSent) response.writeHead(500);
    response.end();
  });
});
server.keepAliveTimeout = 0;
server.listen(0, "127.0.0.1", () => {
  const { port } = server.address();
  process.stdout.write(JSON.stringify({ event: "listening", address: `127.0.0.1:${port}` }) + "\n");
});
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
