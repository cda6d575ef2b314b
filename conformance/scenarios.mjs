// The conformance scenarios: what an AI SDK chat app does against a server (send, close the tab
// and reload, Stop, a new question while an answer is live, two tabs, Last-Event-ID, bad input),
// played with the real client, each checking what the wire contract says (the first failing
// check ends the scenario with its message). Used by the kit's runner (run.mjs) and by the e2e
// tests' driver (tests/e2e/ai-sdk/chat-driver.mjs), whose pytest side adds exact checks for the
// gateway's echo producer.
//
// Nothing here knows the server's producer: the long answers come from the prompt (numbered
// words w0..w59 to repeat) plus whatever the caller merges into the POST body (run.mjs --body),
// and every answer is compared with what the server persisted (GET /api/chat/{id}/messages).

import { isDeepStrictEqual } from "node:util";

import {
  WAIT_MS,
  lastAssistant,
  lastEventIdIn,
  normalParts,
  repeatedWords,
  session,
  shownLength,
  sseChunks,
  sseEvents,
  textOf,
} from "./harness.mjs";

export const numbered = (n, from = 0) =>
  Array.from({ length: n }, (_, i) => `w${from + i}`).join(" ");

/** The prompt of the long answers: a server's model repeats the words; the echo says them. */
export const LONG_PROMPT = `Repeat these words exactly, separated by spaces: ${numbered(60)}`;
export const SHORT_PROMPT = "hello relay world";
/** Characters of answer shown before a scenario cuts it (a closed tab, a Stop). */
const SHOWN = 40;

export class CheckFailed extends Error {}
export class Skipped extends Error {}

const brief = (value, max = 300) => {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > max ? `${text.slice(0, max)}...` : text;
};

/** The client has been busy since its status history had `mark` entries, and is no longer. */
const settledSince = (state, mark) =>
  state.statuses.length > mark && (state.status === "ready" || state.status === "error");

const isTool = (part) => part.type === "dynamic-tool" || part.type?.startsWith("tool-");

/** A scenario's context: the session (harness.mjs) plus checks and the steps scenarios share. */
export function context(options) {
  const s = session(options);
  const t = {
    ...s,
    check(ok, what) {
      if (!ok) throw new CheckFailed(what);
    },
    equal(actual, expected, what) {
      t.check(isDeepStrictEqual(actual, expected), `${what}: expected ${brief(expected)}, got ${brief(actual)}`);
    },
    skip(why) {
      throw new Skipped(why);
    },

    /** The client's (and scenario's) exchanges `method` to a path ending in `end`. */
    exchanges: (method, end) =>
      s.report.exchanges.filter((e) => e.method === method && e.path.endsWith(end)),
    /** The one such exchange. */
    exchange(method, end) {
      const found = t.exchanges(method, end);
      t.check(found.length === 1, `expected one ${method} *${end} request, saw ${found.length}`);
      return found[0];
    },

    /** The messages the server persisted for the chat. */
    async persisted(what = "GET /messages") {
      const got = await s.request(`${s.chatPath}/messages`);
      t.check(got.status === 200, `${what}: status 200, got ${got.status} ${brief(got.text)}`);
      t.check(Array.isArray(got.json?.messages), `${what}: a JSON {messages: [...]}, got ${brief(got.text)}`);
      return got.json.messages;
    },

    /** An SSE answer: 200, the stream headers; if `ended`, `[DONE]`, the body closed, ids rising. */
    checkSse(exchange, what, { ended = true } = {}) {
      t.check(exchange.status === 200, `${what}: status 200, got ${exchange.status ?? exchange.fetchError}`);
      const type = exchange.headers["content-type"] ?? "";
      t.check(type.startsWith("text/event-stream"), `${what}: content-type text/event-stream, got ${brief(type)}`);
      const marker = exchange.headers["x-vercel-ai-ui-message-stream"];
      t.check(marker === "v1", `${what}: header x-vercel-ai-ui-message-stream: v1, got ${brief(marker)}`);
      const chunks = sseChunks(exchange.body);
      t.check(chunks.every((c) => c && typeof c.type === "string"), `${what}: every data line a JSON chunk with a type`);
      const ids = sseEvents(exchange.body).map((e) => e.id).filter((id) => id != null).map(Number);
      t.check(ids.every((id, i) => i === 0 || id > ids[i - 1]), `${what}: SSE ids must increase, got ${brief(ids)}`);
      if (!ended) return;
      t.check((exchange.body ?? "").endsWith("data: [DONE]\n\n"), `${what}: ends with data: [DONE]`);
      t.check(exchange.bodyEnd === "closed", `${what}: the server closes the body after [DONE] (got ${exchange.bodyEnd})`);
    },

    /** The messageId of a body's `start` chunk (exactly one). */
    startId(exchange, what) {
      const starts = sseChunks(exchange.body).filter((c) => c?.type === "start");
      t.check(starts.length === 1, `${what}: one start chunk, saw ${starts.length}`);
      t.check(typeof starts[0].messageId === "string", `${what}: the start chunk names the message (messageId)`);
      return starts[0].messageId;
    },

    /** A resume that found the live answer: a whole, self-contained answer from `start`. */
    checkResumed(resume, startId, what = "the resume") {
      t.check(
        resume.status !== 204,
        `${what}: 204, no live answer to resume: the abort ended it, or it finished first ` +
          "(ask for a longer or slower answer with --body)",
      );
      t.checkSse(resume, what);
      const first = sseChunks(resume.body)[0];
      t.check(
        first?.type === "start",
        `${what}: must begin with the start chunk (the client starts a resumed answer from an empty message), got ${brief(first)}`,
      );
      t.equal(first.messageId, startId, `${what}: the start chunk's messageId is the answer's`);
    },

    /** The client settled without an error. */
    checkReady(state, what) {
      t.check(state.status === "ready", `${what}: client status ready, got ${state.status} (${state.error?.message ?? ""})`);
      t.check(!state.error, `${what}: no client error, got ${brief(String(state.error?.message ?? state.error))}`);
    },

    /** The client shows what the server persisted: the same messages, ids and parts, and no
     * numbered word twice in any part. */
    async checkAsPersisted(state, what) {
      const shown = state.messages;
      for (const message of shown) {
        const twice = repeatedWords(message);
        t.check(!twice.length, `${what}: words shown twice in ${message.role} ${message.id}: ${twice.join(", ")}`);
      }
      const stored = await t.persisted();
      t.equal(shown.map((m) => `${m.role}:${m.id}`), stored.map((m) => `${m.role}:${m.id}`), `${what}: the client's messages are the server's`);
      shown.forEach((message, i) => t.sameParts(message, stored[i], `${what}: ${message.role} ${message.id} as persisted`));
    },

    /** `message` has the parts of `expected` (normalParts); the message names the first difference. */
    sameParts(message, expected, what) {
      const [got, want] = [normalParts(message), normalParts(expected)];
      const outline = (parts) => parts.map((p) => (p.state ? `${p.type}:${p.state}` : p.type)).join(", ");
      t.check(
        got.length === want.length,
        `${what}: ${want.length} parts [${outline(want)}], the client has ${got.length} [${outline(got)}]`,
      );
      const i = got.findIndex((part, j) => !isDeepStrictEqual(part, want[j]));
      if (i >= 0) t.equal(got[i], want[i], `${what}: part ${i}`);
    },

    /** Waits until the answer after `before` messages shows `SHOWN` characters while live
     * (call it right after starting the send). */
    async waitShown({ state }, before, what = "the answer") {
      const live = (s) => s.messages.length >= before + 2 && lastAssistant(s);
      const mark = state.statuses.length;
      await state.until(
        (s) => (live(s) && shownLength(lastAssistant(s)) >= SHOWN) || settledSince(s, mark),
        `${SHOWN} characters of ${what}`,
      );
      t.check(state.status !== "error", `${what}: the client failed: ${state.error?.message}`);
      t.check(state.status !== "ready", `${what} ended before ${SHOWN} characters: ask for a longer answer (--body)`);
    },

    /** Sends the long question, waits for some answer, then aborts the fetch as a closed tab
     * does (the client's stop() never tells the server). */
    async sendAndCut(page, prompt = LONG_PROMPT) {
      const before = page.state.messages.length;
      const sending = page.chat.sendMessage({ text: prompt });
      await t.waitShown(page, before);
      await page.chat.stop();
      await sending;
      const partial = lastAssistant(page.state);
      s.report.afterAbort = {
        status: page.state.status,
        text: textOf(partial),
        messageCount: page.state.messages.length,
      };
      t.check(page.state.status === "ready", `after stop(): client status ready, got ${page.state.status}`);
    },

    /** A reloaded page: the stored messages, then the client's resume (useChat's resume: true). */
    async reload(options) {
      const loaded = await t.persisted("GET /messages on reload");
      s.report.loadedOnReload = loaded;
      return s.open(structuredClone(loaded), options);
    },
  };
  return t;
}

/** Send and receive one whole answer. */
async function send(t) {
  const page = t.open();
  t.report.sent = SHORT_PROMPT;
  await page.chat.sendMessage({ text: t.report.sent });
  t.report.afterSend = { status: page.state.status };
  const post = t.exchange("POST", "/api/chat");
  await post.ended;
  t.checkSse(post, "the POST");
  t.checkReady(page.state, "after the answer");
  t.equal(page.state.messages.map((m) => m.role), ["user", "assistant"], "the chat's roles");
  t.equal(page.state.messages[1].id, t.startId(post, "the POST"), "the answer's id is the start chunk's messageId");
  t.check(t.report.finishes.length === 1, `one onFinish, saw ${t.report.finishes.length}`);
  const finish = t.report.finishes[0];
  t.check(!(finish.isAbort || finish.isError || finish.isDisconnect), `onFinish without abort or error: ${brief(finish)}`);
  await t.checkAsPersisted(page.state, "after the answer");
}

/** A completed answer, then a resume: 204, and the client keeps its messages. */
async function resume204(t) {
  const page = t.open();
  t.report.sent = "resume me later";
  await page.chat.sendMessage({ text: t.report.sent });
  t.report.afterSend = { status: page.state.status, messages: structuredClone(page.state.messages) };
  t.checkReady(page.state, "after the answer");
  await page.chat.resumeStream();
  t.report.afterResume = { status: page.state.status };
  const resume = t.exchange("GET", "/stream");
  t.check(resume.status === 204, `the resume after the answer ended: 204, got ${resume.status}`);
  t.checkReady(page.state, "after the resume");
  t.equal(page.state.messages, t.report.afterSend.messages, "the resume leaves the messages as they were");
  const post = t.exchange("POST", "/api/chat");
  t.equal(page.state.messages[1]?.id, t.startId(post, "the POST"), "the answer's id is the start chunk's messageId");
  await t.checkAsPersisted(page.state, "after the resume");
}

/** stop() mid-answer (only the fetch ends, like a closed tab), then resumeStream(). */
async function abortResume(t) {
  const page = t.open();
  t.report.sent = LONG_PROMPT;
  await t.sendAndCut(page);
  await page.chat.resumeStream();
  t.report.afterResume = { status: page.state.status };
  await checkResumedAnswer(t, page);
}

/** The tab closes mid-answer; a new page loads the stored messages and resumes on mount. */
async function reloadResume(t) {
  const first = t.open();
  t.report.sent = LONG_PROMPT;
  await t.sendAndCut(first);
  const page = await t.reload();
  await page.chat.resumeStream();
  t.report.afterResume = { status: page.state.status };
  await checkResumedAnswer(t, page);
}

async function checkResumedAnswer(t, page, { resumes = 1 } = {}) {
  const post = t.exchange("POST", "/api/chat");
  const startId = t.startId(post, "the POST");
  const found = t.exchanges("GET", "/stream");
  t.check(found.length === resumes, `${resumes} resume request(s), saw ${found.length}`);
  for (const resume of found) {
    await resume.ended;
    t.checkResumed(resume, startId);
  }
  t.checkReady(page.state, "after the resume");
  t.equal(page.state.messages.map((m) => m.role), ["user", "assistant"], "the chat's roles after the resume");
  t.equal(page.state.messages[1].id, startId, "the resumed answer's id is the start chunk's messageId");
  await t.checkAsPersisted(page.state, "after the resume");
}

/** Three turns; the third answer is cut by a closed tab and a new page resumes it: every answer
 * shown once, under its start chunk's id. */
async function thirdTurnReload(t) {
  const first = t.open();
  t.report.turns = ["first turn", "second turn", LONG_PROMPT];
  for (const text of t.report.turns.slice(0, 2)) {
    await first.chat.sendMessage({ text });
    t.checkReady(first.state, `after "${text}"`);
  }
  await t.sendAndCut(first, LONG_PROMPT);
  const page = await t.reload();
  await page.chat.resumeStream();
  t.report.afterResume = { status: page.state.status };

  const posts = t.exchanges("POST", "/api/chat");
  t.check(posts.length === 3, `three POSTs, saw ${posts.length}`);
  const startIds = posts.map((post, i) => t.startId(post, `POST ${i + 1}`));
  t.check(new Set(startIds).size === 3, `three distinct answer ids, got ${brief(startIds)}`);
  const resume = t.exchange("GET", "/stream");
  await resume.ended;
  t.checkResumed(resume, startIds[2]);
  t.checkReady(page.state, "after the resume");
  const roles = ["user", "assistant", "user", "assistant", "user", "assistant"];
  t.equal(page.state.messages.map((m) => m.role), roles, "the chat's roles after the resume");
  const answers = page.state.messages.filter((m) => m.role === "assistant");
  t.equal(answers.map((m) => m.id), startIds, "each answer's id is its start chunk's messageId");
  const texts = answers.map((m) => textOf(m));
  t.check(new Set(texts).size === 3, `three different answers, got ${brief(texts)}`);
  await t.checkAsPersisted(page.state, "after the resume");
}

/** Two tabs resume the same live answer at once: both see it whole, the same. */
async function twoReaders(t) {
  const first = t.open();
  t.report.sent = LONG_PROMPT;
  await t.sendAndCut(first);
  const loaded = await t.persisted("GET /messages on reload");
  const a = t.open(structuredClone(loaded));
  const b = t.open(structuredClone(loaded));
  await Promise.all([a.chat.resumeStream(), b.chat.resumeStream()]);
  await checkResumedAnswer(t, a, { resumes: 2 });
  await checkResumedAnswer(t, b, { resumes: 2 });
  t.sameParts(a.state.messages[1], b.state.messages[1], "both readers show the same answer");
}

/** Two reloaded pages resume the same live answer, one asking `?replay=plain` (each delta as
 * it was streamed), one with the server's default (stream-relay: compacted, each part's deltas
 * merged): both show the same message, as persisted. A server without `replay` ignores it. */
async function replayModes(t) {
  const first = t.open();
  t.report.sent = LONG_PROMPT;
  await t.sendAndCut(first);
  const loaded = await t.persisted("GET /messages on reload");
  const plain = t.open(structuredClone(loaded), { resumeQuery: "replay=plain" });
  const compact = t.open(structuredClone(loaded));
  await Promise.all([plain.chat.resumeStream(), compact.chat.resumeStream()]);
  await checkResumedAnswer(t, plain, { resumes: 2 });
  await checkResumedAnswer(t, compact, { resumes: 2 });
  const [a, b] = [plain.state.messages[1], compact.state.messages[1]];
  t.equal(b, a, "the compacted resume shows exactly the plain resume's message");
  const events = t.exchanges("GET", "/stream").map((e) => sseEvents(e.body).length);
  t.report.resumeEvents = events;
}

/** The explicit stop: POST {chat}/stop with the client's partial, then stop(); a later resume
 * finds nothing (204) and changes nothing. */
async function stopRoute(t) {
  const page = t.open();
  t.report.sent = LONG_PROMPT;
  const sending = page.chat.sendMessage({ text: t.report.sent });
  await t.waitShown(page, 0);
  const partial = structuredClone(lastAssistant(page.state));
  t.report.partialSent = { id: partial.id, text: textOf(partial) };
  t.report.stopResponse = await t.request(`${t.chatPath}/stop`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ assistantMessage: partial }),
  });
  await page.chat.stop();
  await sending;
  t.report.afterStop = { status: page.state.status, messages: structuredClone(page.state.messages) };
  t.report.persistedAfterStop = await t.request(`${t.chatPath}/messages`);
  await page.chat.resumeStream();
  t.report.afterResume = { status: page.state.status };

  const stop = t.report.stopResponse;
  t.check(stop.status >= 200 && stop.status < 300, `POST /stop: 2xx, got ${stop.status} ${brief(stop.text)}`);
  if (stop.json && "stopped" in stop.json) t.equal(stop.json.stopped, true, "POST /stop: stopped");
  if (stop.json && "outcome" in stop.json) t.equal(stop.json.outcome, "stopped", "POST /stop: outcome");
  const post = t.exchange("POST", "/api/chat");
  t.equal(partial.id, t.startId(post, "the POST"), "the partial's id is the start chunk's messageId");
  const stored = await t.persisted("GET /messages after the stop");
  t.equal(stored.map((m) => m.role), ["user", "assistant"], "persisted after the stop: roles");
  t.equal(stored[1].id, partial.id, "persisted after the stop: the partial's id");
  for (const type of ["text", "reasoning"]) {
    t.equal(textOf(stored[1], type), textOf(partial, type), `persisted after the stop: the ${type} the client had`);
  }
  const resume = t.exchange("GET", "/stream");
  t.check(resume.status === 204, `the resume after the stop: 204 (a stopped answer is not resumable), got ${resume.status}`);
  t.checkReady(page.state, "after the stop and resume");
  t.equal(page.state.messages, t.report.afterStop.messages, "the resume leaves the messages as they were");
}

/** A new question while the answer is live (the stock client's stop() did not tell the
 * server): the POST gets the new answer, and the old answer's stream ends. */
async function supersede(t) {
  const page = t.open();
  t.report.sent = LONG_PROMPT;
  const sending = page.chat.sendMessage({ text: t.report.sent });
  await t.waitShown(page, 0);
  // Another tab follows the first answer (once its response has started, it reads the first
  // answer); it must end when the new answer takes over.
  const follower = await t.follow(`${t.chatPath}/stream`);
  const followed = follower.text();
  await page.chat.stop();
  await sending;
  t.report.second = "a new question";
  await page.chat.sendMessage({ text: t.report.second });
  t.report.afterSecond = { status: page.state.status };
  const timer = new Promise((resolve) => setTimeout(resolve, WAIT_MS, "timeout").unref());
  const ended = await Promise.race([followed.then(() => "ended", () => "ended"), timer]);
  t.check(ended === "ended", `the old answer's reader did not end ${WAIT_MS} ms after the new answer`);
  await follower.exchange.ended;

  const posts = t.exchanges("POST", "/api/chat");
  t.check(posts.length === 2, `two POSTs, saw ${posts.length}`);
  await posts[1].ended;
  t.checkSse(posts[1], "the second POST");
  const [oldId, newId] = posts.map((post, i) => t.startId(post, `POST ${i + 1}`));
  t.check(oldId !== newId, "the new answer has its own id");
  const oldReader = t.exchange("GET", "/stream");
  t.checkSse(oldReader, "the old answer's reader");
  t.equal(t.startId(oldReader, "the old answer's reader"), oldId, "the old answer's reader follows the old answer");
  t.checkReady(page.state, "after the new answer");
  const roles = page.state.messages.map((m) => m.role);
  t.equal(roles, ["user", "assistant", "user", "assistant"], "the chat's roles");
  t.equal(page.state.messages.map((m) => m.id).filter((_, i) => i % 2), [oldId, newId], "the answers' ids");
  const stored = await t.persisted();
  t.equal(stored.map((m) => `${m.role}:${m.id}`), page.state.messages.map((m) => `${m.role}:${m.id}`), "persisted: the client's messages");
  t.sameParts(page.state.messages[3], stored[3], "the new answer as persisted");
  t.check(!repeatedWords(page.state.messages[3]).length, "no word twice in the new answer");
  const resume = await t.request(`${t.chatPath}/stream`);
  t.check(resume.status === 204, `a resume after the new answer ended: 204, got ${resume.status}`);
}

/** Where a Last-Event-ID scenario cuts the answer: the client shows a part of this kind streaming. */
const STREAMING = {
  text: (part) => part.type === "text" && part.state === "streaming" && part.text.length >= 10,
  reasoning: (part) => part.type === "reasoning" && part.state === "streaming" && part.text.length >= 10,
  tool: (part) => isTool(part) && part.state === "input-streaming" && JSON.stringify(part.input ?? "").length >= 10,
};
/** The chunk types inside a part of each kind (for where the last event seen landed). */
const INSIDE = {
  text: ["text-start", "text-delta"],
  reasoning: ["reasoning-start", "reasoning-delta"],
  tool: ["tool-input-start", "tool-input-delta"],
};

/** The tab closes while a `kind` part streams; the app remembers the SSE id of the last event it
 * saw and resumes with it as Last-Event-ID (in the same client, or from a reloaded page). The
 * answer ends up whole, as persisted, with no client error. */
const lastEventId = (kind, reload) => async (t) => {
  let seen = null;
  const first = t.open([], { lastEventId: () => seen });
  t.report.sent = LONG_PROMPT;
  const mark = first.state.statuses.length;
  const sending = first.chat.sendMessage({ text: t.report.sent });
  await first.state.until(
    (s) => (lastAssistant(s)?.parts ?? []).some(STREAMING[kind]) || settledSince(s, mark),
    `a ${kind} part streaming`,
  );
  if (first.state.status === "ready" && kind !== "text") {
    await sending;
    t.skip(`the answer had no ${kind} part (ask the server for one with --body)`);
  }
  t.check(first.state.status === "streaming", `waiting for a ${kind} part: the answer ended first (status ${first.state.status}, ${first.state.error?.message ?? ""})`);
  await first.chat.stop();
  await sending;
  const post = t.exchange("POST", "/api/chat");
  await post.ended;
  seen = lastEventIdIn(post.body);
  t.check(seen != null, "the POST's SSE events carry no id: lines, so there is no Last-Event-ID to resume from");
  const events = sseEvents(post.body);
  const at = events.findIndex((e) => e.id === seen);
  const landed = JSON.parse(events[at].data);
  t.report.cut = { lastEventId: seen, landedIn: landed, shown: structuredClone(lastAssistant(first.state)) };
  t.check(INSIDE[kind].includes(landed.type), `the cut must land inside the ${kind} part; the last event seen was ${brief(landed)}`);

  const page = reload ? await t.reload({ lastEventId: () => seen }) : first;
  await page.chat.resumeStream();
  t.report.afterResume = { status: page.state.status };
  const resume = t.exchange("GET", "/stream");
  t.equal(resume.lastEventId, seen, "the resume carries Last-Event-ID");
  await resume.ended;
  const startId = t.startId(post, "the POST");
  t.checkResumed(resume, startId, `the resume from Last-Event-ID ${seen}`);
  t.checkReady(page.state, "after the resume");
  t.equal(page.state.messages.map((m) => m.role), ["user", "assistant"], "the chat's roles after the resume");
  t.equal(page.state.messages[1].id, startId, "the resumed answer's id is the start chunk's messageId");
  t.check(
    (page.state.messages[1].parts ?? []).some((p) => p.type === kind || (kind === "tool" && isTool(p))),
    `the resumed answer has its ${kind} part`,
  );
  await t.checkAsPersisted(page.state, "after the resume");
};

/** Malformed JSON and a body without a chat id get a 4xx with a JSON body; the server goes on. */
async function badInput(t) {
  const message = { id: "u1", role: "user", parts: [{ type: "text", text: "hi" }] };
  const bad = {
    "malformed JSON": '{"id": "x", "messages": [',
    "no chat id": JSON.stringify({ ...t.body, messages: [message], trigger: "submit-message" }),
    "messages not a list": JSON.stringify({ ...t.body, id: t.chatId, messages: "hi", trigger: "submit-message" }),
  };
  t.report.badInput = {};
  for (const [what, body] of Object.entries(bad)) {
    const got = await t.request("/api/chat", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
    });
    t.report.badInput[what] = got;
    t.check(got.status >= 400 && got.status < 500, `${what}: a 4xx, got ${got.status} ${brief(got.text)}`);
    t.check(got.json !== null && typeof got.json === "object", `${what}: a JSON body, got ${brief(got.text)}`);
  }
  const page = t.open();
  await page.chat.sendMessage({ text: "still there?" });
  t.checkReady(page.state, "a good request after the bad ones");
  t.equal(page.state.messages.map((m) => m.role), ["user", "assistant"], "the chat's roles");
  await t.checkAsPersisted(page.state, "a good request after the bad ones");
}

/** Every scenario, in the order the kit plays and prints them. */
export const SCENARIOS = {
  send,
  "resume-204": resume204,
  "abort-resume": abortResume,
  "reload-resume": reloadResume,
  "third-turn-reload": thirdTurnReload,
  "two-readers": twoReaders,
  "replay-modes": replayModes,
  "stop-route": stopRoute,
  supersede,
  "last-event-id-text": lastEventId("text", false),
  "last-event-id-text-reload": lastEventId("text", true),
  "last-event-id-reasoning": lastEventId("reasoning", false),
  "last-event-id-reasoning-reload": lastEventId("reasoning", true),
  "last-event-id-tool": lastEventId("tool", false),
  "last-event-id-tool-reload": lastEventId("tool", true),
  "bad-input": badInput,
};

/**
 * Plays one scenario: returns {status: "pass" | "fail" | "skip", failure, report} where report
 * holds what the client saw (every exchange with its raw body, onFinish calls, the last page's
 * status and messages). `timeoutMs` bounds the whole scenario.
 */
export async function play(name, options, { timeoutMs = 60_000 } = {}) {
  const scenario = SCENARIOS[name];
  if (!scenario) throw new Error(`unknown scenario ${name}; known: ${Object.keys(SCENARIOS).join(", ")}`);
  const t = context({ ...options, name });
  let status = "pass";
  let failure = null;
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`the scenario ran over ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    await Promise.race([scenario(t), timeout]);
  } catch (error) {
    if (error instanceof Skipped) {
      status = "skip";
      failure = error.message;
    } else {
      status = "fail";
      failure = error instanceof CheckFailed ? error.message : String(error?.stack ?? error);
    }
  } finally {
    clearTimeout(timer);
  }
  if (status === "fail") for (const page of t.pages) await page.chat.stop().catch(() => {});
  // Every captured body ends when its response does; a stuck one is reported, not waited for.
  await t.settle();
  const last = t.pages.at(-1);
  Object.assign(t.report, {
    status: last?.state.status ?? null,
    error: last?.state.error ? String(last.state.error.message ?? last.state.error) : null,
    statuses: last?.state.statuses ?? [],
    messages: last?.state.messages ?? [],
  });
  return { status, failure, report: t.report };
}
