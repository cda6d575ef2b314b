// Resumes one live answer through the gateway with the real AI SDK chat client, as a reloaded page
// does (`resumeStream()` on a chat that has nothing of the answer yet), once per replay mode in
// turn, and prints one JSON line per resume:
//   {"mode": "plain"|"compact", "run": n, "ms": ..., "events": ..., "bytes": ...}
// `ms` runs from resumeStream() until the client's message holds the whole text (`chars` long);
// `events` and `bytes` are the SSE events and body bytes the client had received by then.
//
//   node resume.mjs <gateway url> <chat id> <chars> <runs> [mode,mode...]

import { AbstractChat, DefaultChatTransport } from "ai";

const [base, chatId, charsArg, runsArg, modesArg = "plain,compact"] = process.argv.slice(2);
const chars = Number(charsArg);
const runs = Number(runsArg);
const modes = modesArg.split(",");

/** A ChatState like the framework bindings': each stored message is a structuredClone. */
class State {
  status = "ready";
  error = undefined;
  messages = [];
  #listeners = new Set();
  pushMessage = (message) => {
    this.messages = [...this.messages, structuredClone(message)];
    this.#changed();
  };
  popMessage = () => {
    this.messages = this.messages.slice(0, -1);
    this.#changed();
  };
  replaceMessage = (index, message) => {
    this.messages = this.messages.with(index, structuredClone(message));
    this.#changed();
  };
  snapshot = (value) => structuredClone(value);
  until(predicate) {
    return new Promise((resolve) => {
      const check = () => predicate(this) && (this.#listeners.delete(check), resolve(), true);
      if (!check()) this.#listeners.add(check);
    });
  }
  #changed() {
    for (const listener of [...this.#listeners]) listener();
  }
}

class Chat extends AbstractChat {}

const textLength = (state) =>
  (state.messages.at(-1)?.parts ?? [])
    .filter((part) => part.type === "text")
    .reduce((sum, part) => sum + part.text.length, 0);

async function resumeOnce(mode) {
  const seen = { events: 0, bytes: 0 };
  const counting = async (input, init) => {
    const response = await fetch(input, init);
    if (!response.body) return response;
    const decoder = new TextDecoder();
    let carry = "";
    const counter = new TransformStream({
      transform(chunk, controller) {
        seen.bytes += chunk.byteLength;
        const events = (carry + decoder.decode(chunk, { stream: true })).split("\n\n");
        carry = events.pop();
        seen.events += events.filter((event) => event.includes("data: ")).length;
        controller.enqueue(chunk);
      },
    });
    const { status, headers } = response;
    return new Response(response.body.pipeThrough(counter), { status, headers });
  };
  const state = new State();
  const chat = new Chat({
    id: chatId,
    state,
    transport: new DefaultChatTransport({
      api: `${base}/api/chat`,
      fetch: counting,
      prepareReconnectToStreamRequest: ({ id }) => ({
        api: `${base}/api/chat/${encodeURIComponent(id)}/stream?replay=${mode}`,
      }),
    }),
  });
  const whole = state.until((s) => textLength(s) >= chars);
  const began = performance.now();
  const resuming = chat.resumeStream();
  await whole;
  const ms = performance.now() - began;
  const result = { mode, ms, events: seen.events, bytes: seen.bytes, chars: textLength(state) };
  await chat.stop();
  await resuming;
  return result;
}

for (let run = -1; run < runs; run++) {
  for (const mode of modes) {
    const result = await resumeOnce(mode);
    process.stdout.write(`${JSON.stringify({ ...result, run })}\n`);
  }
}
