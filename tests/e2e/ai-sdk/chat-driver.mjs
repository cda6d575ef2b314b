// Drives the real AI SDK chat client (AbstractChat + DefaultChatTransport) against the gateway.
//
//   node chat-driver.mjs <gateway url> <scenario> [npm package name, default "ai"]
//
// With GATEWAY_TOKEN in the environment (a gateway in JWT mode), every request carries it as
// `Authorization: Bearer`: the client's through DefaultChatTransport's `headers`, the driver's own
// (stop, messages) by hand, as an app would.
//
// Prints one JSON object on stdout: what the client saw (its status, its messages, every
// onFinish, every HTTP exchange with the raw response body). It asserts nothing: the pytest side
// (tests/test_ai_sdk_e2e.py) does. Waits are on the client's own state changes, never on sleeps.

import { randomUUID } from "node:crypto";

const [url, scenario, packageName = "ai"] = process.argv.slice(2);
if (!url || !scenario) {
  process.stderr.write("usage: node chat-driver.mjs <gateway url> <scenario> [package]\n");
  process.exit(2);
}
const ai = await import(packageName);
const { AbstractChat, DefaultChatTransport } = ai;

const WAIT_MS = 15_000;
const TOKEN = process.env.GATEWAY_TOKEN || "";
const AUTH = TOKEN ? { authorization: `Bearer ${TOKEN}` } : {};

/** A ChatState in memory, like the React/Vue bindings' but telling listeners of every change. */
class MemoryChatState {
  #status = "ready";
  #error = undefined;
  #messages;
  #listeners = new Set();
  statuses = ["ready"];

  constructor(messages = []) {
    this.#messages = messages;
  }

  get status() {
    return this.#status;
  }
  set status(status) {
    this.#status = status;
    this.statuses.push(status);
    this.#changed();
  }
  get error() {
    return this.#error;
  }
  set error(error) {
    this.#error = error;
    this.#changed();
  }
  get messages() {
    return this.#messages;
  }
  set messages(messages) {
    this.#messages = [...messages];
    this.#changed();
  }
  pushMessage = (message) => {
    this.#messages = [...this.#messages, this.snapshot(message)];
    this.#changed();
  };
  popMessage = () => {
    this.#messages = this.#messages.slice(0, -1);
    this.#changed();
  };
  replaceMessage = (index, message) => {
    this.#messages = [
      ...this.#messages.slice(0, index),
      this.snapshot(message),
      ...this.#messages.slice(index + 1),
    ];
    this.#changed();
  };
  snapshot = (thing) => structuredClone(thing);

  /** Resolves once `predicate(this)` holds (checked now and after every change). */
  until(predicate, what, timeoutMs = WAIT_MS) {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (!predicate(this)) return false;
        this.#listeners.delete(check);
        clearTimeout(timer);
        resolve();
        return true;
      };
      const timer = setTimeout(() => {
        this.#listeners.delete(check);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      if (!check()) this.#listeners.add(check);
    });
  }

  #changed() {
    for (const listener of [...this.#listeners]) listener();
  }
}

/** AbstractChat is abstract only for the framework bindings; the state is all it needs. */
class Chat extends AbstractChat {}

/** fetch that records each exchange and, from a clone, the raw response body. */
function recordingFetch(exchanges, bodies) {
  return async (input, init = {}) => {
    const sent = new Headers(init.headers ?? {});
    const exchange = {
      method: init.method ?? "GET",
      path: new URL(String(input)).pathname,
      requestBody: typeof init.body === "string" ? JSON.parse(init.body) : null,
      // What the request said about itself (the token's presence only, never its value).
      contentType: sent.get("content-type"),
      authorized: sent.get("authorization") === `Bearer ${TOKEN}` && TOKEN !== "",
    };
    exchanges.push(exchange);
    let response;
    try {
      response = await fetch(input, init);
    } catch (error) {
      exchange.fetchError = String(error);
      throw error;
    }
    exchange.status = response.status;
    exchange.headers = Object.fromEntries(response.headers);
    if (response.body) bodies.push(capture(response.clone(), exchange));
    return response;
  };
}

/** Reads a response body to its end (or its abort), keeping what arrived. */
async function capture(response, exchange) {
  const decoder = new TextDecoder();
  const reader = response.body.getReader();
  exchange.body = "";
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      exchange.body += decoder.decode(value, { stream: true });
    }
    exchange.bodyEnd = "closed";
  } catch (error) {
    exchange.bodyEnd = `errored: ${error?.name ?? error}`;
  }
}

const textOf = (message) =>
  (message?.parts ?? [])
    .filter((part) => part.type === "text")
    .map((part) => part.text)
    .join("");

const lastAssistant = (state) => {
  const last = state.messages.at(-1);
  return last?.role === "assistant" ? last : undefined;
};

const numbered = (n) => Array.from({ length: n }, (_, i) => `w${i}`).join(" ");

async function getJson(path, init = {}) {
  const response = await fetch(`${url}${path}`, {
    ...init,
    headers: { ...AUTH, ...(init.headers ?? {}) },
  });
  const text = await response.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON: the raw text is reported
  }
  return { status: response.status, json, text };
}

/** Opens chat clients that share the report's records: one per page load. */
function clients(report) {
  const chatId = `e2e-${scenario}-${randomUUID()}`;
  const exchanges = [];
  const bodies = [];
  const finishes = [];
  const errors = [];
  Object.assign(report, { chatId, exchanges, finishes, errors });
  const opened = [];
  let seq = 0;
  const open = (messages = []) => {
    const state = new MemoryChatState(messages);
    const chat = new Chat({
      id: chatId,
      state,
      generateId: () => `client-${++seq}`,
      transport: new DefaultChatTransport({
        api: `${url}/api/chat`,
        headers: AUTH,
        fetch: recordingFetch(exchanges, bodies),
      }),
      onFinish: ({ message, isAbort, isDisconnect, isError, finishReason }) => {
        finishes.push({
          messageId: message.id,
          text: textOf(message),
          isAbort,
          isDisconnect,
          isError,
          finishReason: finishReason ?? null,
        });
      },
      onError: (error) => errors.push(String(error?.message ?? error)),
    });
    opened.push(state);
    return { chat, state };
  };
  return { open, opened, bodies };
}

const scenarios = {
  /** Send, await the whole answer. */
  async send(report, { chat, state }) {
    report.sent = "hello relay world";
    await chat.sendMessage({ text: report.sent });
    report.afterSend = { status: state.status };
  },

  /** Send asking for a longer answer (the echo repeats its words to reach `chunks`). */
  async "send-chunks"(report, { chat, state }) {
    report.sent = "alpha beta";
    await chat.sendMessage({ text: report.sent }, { body: { options: { chunks: "12" } } });
    report.afterSend = { status: state.status };
  },

  /** stop() mid-answer (only the fetch is aborted, like a closed tab), then resumeStream(). */
  async "abort-resume"(report, { chat, state }) {
    report.sent = numbered(60);
    const sending = chat.sendMessage({ text: report.sent });
    await state.until((s) => textOf(lastAssistant(s)).length >= 40, "40 characters of answer");
    await chat.stop();
    await sending;
    report.afterAbort = {
      status: state.status,
      text: textOf(lastAssistant(state)),
      messageCount: state.messages.length,
    };
    await chat.resumeStream();
    report.afterResume = { status: state.status };
  },

  /** The explicit stop: POST /stop with the client's partial (and the id of the message the
   *  answer replies to, as the README's stopStream sends it), then stop(); later a resume. */
  async "stop-route"(report, { chat, state }) {
    report.sent = numbered(60);
    const sending = chat.sendMessage({ text: report.sent });
    await state.until((s) => textOf(lastAssistant(s)).length >= 40, "40 characters of answer");
    const partial = structuredClone(lastAssistant(state));
    report.partialSent = { id: partial.id, text: textOf(partial) };
    report.stopResponse = await getJson(`/api/chat/${encodeURIComponent(chat.id)}/stop`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        assistantMessage: partial,
        messageId: state.messages.findLast((m) => m.role === "user")?.id,
      }),
    });
    await chat.stop();
    await sending;
    report.afterStop = { status: state.status, messages: structuredClone(state.messages) };
    report.persistedAfterStop = await getJson(
      `/api/chat/${encodeURIComponent(chat.id)}/messages`,
    );
    await chat.resumeStream();
    report.afterResume = { status: state.status };
  },

  /** The tab closes mid-answer; a new page loads the stored messages and resumes on mount. */
  async "reload-resume"(report, { chat, state, open }) {
    report.sent = numbered(60);
    const sending = chat.sendMessage({ text: report.sent });
    await state.until((s) => textOf(lastAssistant(s)).length >= 40, "40 characters of answer");
    await chat.stop();
    await sending;
    report.afterAbort = { status: state.status, text: textOf(lastAssistant(state)) };
    const loaded = await getJson(`/api/chat/${encodeURIComponent(chat.id)}/messages`);
    report.loadedOnReload = loaded.json?.messages ?? loaded.text;
    const page = open(structuredClone(loaded.json?.messages ?? []));
    await page.chat.resumeStream();
    report.afterResume = { status: page.state.status };
  },

  /** A completed answer, then resumeStream(): nothing left to resume. */
  async "resume-after-complete"(report, { chat, state }) {
    report.sent = "resume me later";
    await chat.sendMessage({ text: report.sent });
    report.afterSend = { status: state.status, messages: structuredClone(state.messages) };
    await chat.resumeStream();
    report.afterResume = { status: state.status };
  },
};

const report = { scenario, aiVersion: null };
try {
  const { createRequire } = await import("node:module");
  const require = createRequire(import.meta.url);
  report.aiVersion = require(`${packageName}/package.json`).version;
} catch {
  // the version is informative only
}
const run = scenarios[scenario];
if (!run) {
  process.stderr.write(`unknown scenario ${scenario}; known: ${Object.keys(scenarios)}\n`);
  process.exit(2);
}
const { open, opened, bodies } = clients(report);
try {
  await run(report, { ...open(), open });
} catch (error) {
  report.failure = String(error?.stack ?? error);
}
// Every captured body ends when its response does; a stuck one is reported, not waited for.
await Promise.race([Promise.all(bodies), new Promise((r) => setTimeout(r, 5_000).unref())]);
const state = opened.at(-1); // the last page's client
Object.assign(report, {
  status: state.status,
  error: state.error ? String(state.error.message ?? state.error) : null,
  statuses: state.statuses,
  messages: state.messages,
});
process.stdout.write(`${JSON.stringify(report)}\n`, () => process.exit(0));
