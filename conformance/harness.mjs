// The real AI SDK chat client (AbstractChat + DefaultChatTransport) in plain Node, with a chat
// state that says when it changes and a fetch that records every exchange with its raw body.
// Used by the scenarios (scenarios.mjs), the kit's runner (run.mjs) and the e2e tests' driver
// (tests/e2e/ai-sdk/chat-driver.mjs). Waits are on the client's own state, never on sleeps.

import { randomUUID } from "node:crypto";
import { createRequire } from "node:module";

/** The supported majors of `ai`, by the names package.json installs them under. */
export const CLIENTS = { ai5: "ai", ai6: "ai-v6", ai7: "ai-v7" };

export const WAIT_MS = 15_000;

/** The `ai` module of a client ("ai5", "ai6", "ai7", or a package name), and its version. */
export async function loadClient(client) {
  const packageName = CLIENTS[client] ?? client;
  const ai = await import(packageName);
  let version = null;
  try {
    version = createRequire(import.meta.url)(`${packageName}/package.json`).version;
  } catch {
    // the version is informative only
  }
  return { ai, packageName, version };
}

/** A ChatState in memory, like the React/Vue bindings' but telling listeners of every change. */
export class MemoryChatState {
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

/** Reads a response body to its end (or its abort), keeping what arrived as it arrives. */
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

/**
 * One scenario's session with a server: chat clients sharing one chat id and one record of
 * every exchange (`report.exchanges`, each with its raw response body as it arrives),
 * onFinish call and onError.
 *
 *   url      the server's base URL (routes under {url}/api/chat)
 *   ai       the `ai` module (loadClient)
 *   headers  sent on every request (e.g. authorization)
 *   body     merged into every POST body (e.g. {"options": {...}} for the server's producer)
 */
export function session({ url, ai, headers = {}, body = {}, name = "chat" }) {
  const { AbstractChat, DefaultChatTransport } = ai;
  class Chat extends AbstractChat {} // abstract only for the framework bindings
  const chatId = `conformance-${name}-${randomUUID()}`;
  const api = `${url}/api/chat`;
  const chatPath = `/api/chat/${encodeURIComponent(chatId)}`;
  const report = { chatId, exchanges: [], finishes: [], errors: [] };
  const bodies = [];
  const pages = [];
  let seq = 0;

  /** fetch that records each exchange and, from a clone, the raw response body. */
  const recordingFetch = async (input, init = {}) => (await recorded(input, init)).response;

  /** The response and its record. */
  const recorded = async (input, init = {}) => {
    const sent = new Headers(init.headers ?? {});
    const exchange = {
      method: init.method ?? "GET",
      path: new URL(String(input)).pathname,
      query: new URL(String(input)).search,
      requestBody: typeof init.body === "string" ? safeJson(init.body) : null,
      contentType: sent.get("content-type"),
      lastEventId: sent.get("last-event-id"),
      // Whether the request carried the session's authorization (never its value).
      authorized:
        headers.authorization !== undefined && sent.get("authorization") === headers.authorization,
    };
    // Resolves once the response body has ended (not part of the JSON report).
    Object.defineProperty(exchange, "ended", { value: Promise.resolve(), writable: true });
    report.exchanges.push(exchange);
    let response;
    try {
      response = await fetch(input, init);
    } catch (error) {
      exchange.fetchError = String(error);
      throw error;
    }
    exchange.status = response.status;
    exchange.headers = Object.fromEntries(response.headers);
    if (response.body) {
      exchange.ended = capture(response.clone(), exchange);
      bodies.push(exchange.ended);
    }
    return { response, exchange };
  };

  /**
   * A page load: a chat client seeded with `messages`. `lastEventId()`, if given, is called at
   * each resume; a value is sent as the `Last-Event-ID` header (prepareReconnectToStreamRequest),
   * as an app that keeps the SSE ids it saw would. `resumeQuery`, if given, is added to the
   * resume URL (e.g. `replay=plain`).
   */
  const open = (messages = [], { lastEventId, resumeQuery } = {}) => {
    const state = new MemoryChatState(messages);
    const chat = new Chat({
      id: chatId,
      state,
      generateId: () => `client-${++seq}`,
      transport: new DefaultChatTransport({
        api,
        headers,
        body,
        fetch: recordingFetch,
        prepareReconnectToStreamRequest:
          lastEventId || resumeQuery
            ? ({ headers: sentHeaders }) => {
                const id = lastEventId?.();
                const prepared = {};
                if (id != null) prepared.headers = { ...sentHeaders, "Last-Event-ID": String(id) };
                if (resumeQuery) prepared.api = `${api}/${encodeURIComponent(chatId)}/stream?${resumeQuery}`;
                return prepared;
              }
            : undefined,
      }),
      onFinish: ({ message, isAbort, isDisconnect, isError, finishReason }) => {
        report.finishes.push({
          messageId: message.id,
          text: textOf(message),
          isAbort,
          isDisconnect,
          isError,
          finishReason: finishReason ?? null,
        });
      },
      onError: (error) => report.errors.push(String(error?.message ?? error)),
    });
    const page = { chat, state };
    pages.push(page);
    return page;
  };

  /** A request of the scenario's own (not the client's), recorded like the client's: resolves
   * once the response has started, with its record and `text()`, the whole body. */
  const follow = async (path, init = {}) => {
    const { response, exchange } = await recorded(`${url}${path}`, {
      ...init,
      headers: { ...headers, ...(init.headers ?? {}) },
    });
    return { exchange, text: () => response.text() };
  };

  /** A request of the scenario's own: its status, headers, text and JSON (or null). */
  const request = async (path, init = {}) => {
    const { exchange, text: read } = await follow(path, init);
    const text = await read();
    return { status: exchange.status, headers: exchange.headers, text, json: safeJson(text) };
  };

  /** Waits (at most `ms`) for every captured body to end; a stuck one stays reported as such. */
  const settle = (ms = 5_000) =>
    Promise.race([Promise.all(bodies), new Promise((r) => setTimeout(r, ms).unref())]);

  return { chatId, chatPath, api, report, open, pages, request, follow, settle, body };
}

export function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

export const textOf = (message, type = "text") =>
  (message?.parts ?? [])
    .filter((part) => part.type === type)
    .map((part) => part.text)
    .join("");

/** Characters of answer shown so far: its text and reasoning. */
export const shownLength = (message) => textOf(message).length + textOf(message, "reasoning").length;

export const lastAssistant = (state) => {
  const last = state.messages.at(-1);
  return last?.role === "assistant" ? last : undefined;
};

/** The UI message chunks of an SSE body (`data:` lines but `[DONE]`), each with its `id:`. */
export function sseEvents(body) {
  const events = [];
  for (const block of (body ?? "").split("\n\n")) {
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("id:")) id = line.slice(3).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (data.length) events.push({ id, data: data.join("\n") });
  }
  return events;
}

export const sseChunks = (body) =>
  sseEvents(body)
    .filter((e) => e.data !== "[DONE]")
    .map((e) => safeJson(e.data));

/** The last complete SSE event's `id:` in a body received so far (null if none). */
export function lastEventIdIn(body) {
  const complete = (body ?? "").slice(0, (body ?? "").lastIndexOf("\n\n") + 2);
  const ids = sseEvents(complete).map((e) => e.id).filter((id) => id != null);
  return ids.at(-1) ?? null;
}

/** What a message says, for comparisons: its parts' content fields (ids, text, tool input and
 * output, state), leaving out what a client or server may add on its own (metadata). */
export function normalParts(message) {
  const keys = ["type", "text", "state", "toolCallId", "toolName", "input", "output", "errorText"];
  keys.push("url", "mediaType", "sourceId", "title", "data");
  return (message?.parts ?? []).map((part) =>
    Object.fromEntries(keys.filter((k) => part[k] !== undefined).map((k) => [k, part[k]])),
  );
}

/** Numbered words (w0, w1, ...) a part shows more than once: a replay shown twice. */
export function repeatedWords(message) {
  const repeated = [];
  for (const part of message?.parts ?? []) {
    const text =
      typeof part.text === "string" ? part.text : part.input ? JSON.stringify(part.input) : "";
    const counts = new Map();
    for (const word of text.match(/\bw\d+\b/g) ?? []) counts.set(word, (counts.get(word) ?? 0) + 1);
    for (const [word, n] of counts) if (n > 1) repeated.push(`${part.type}:${word}x${n}`);
  }
  return repeated;
}

/** A short transcript of a report, for failure messages. */
export function transcript(report, { bodyChars = 600 } = {}) {
  const lines = [`chat ${report.chatId}`];
  for (const e of report.exchanges ?? []) {
    const body = e.body ?? "";
    const shown = body.length > bodyChars ? `${body.slice(0, bodyChars / 2)} [...] ${body.slice(-bodyChars / 2)}` : body;
    const lei = e.lastEventId ? ` Last-Event-ID ${e.lastEventId}` : "";
    lines.push(
      `${e.method} ${e.path}${lei} -> ${e.status ?? e.fetchError} (body ${e.bodyEnd ?? "none"}): ${JSON.stringify(shown)}`,
    );
  }
  if (report.statuses) lines.push(`statuses ${JSON.stringify(report.statuses)}, error ${JSON.stringify(report.error)}`);
  if (report.messages) lines.push(`messages ${JSON.stringify(report.messages)}`);
  return lines.join("\n");
}
