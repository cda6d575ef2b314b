"use strict";
// The right client pattern for resumable streams (see the gateway's README):
// - a page load fetches the persisted messages, then calls the resume route ONCE, like
//   useChat({ resume: true });
// - Stop first POSTs /api/chat/{id}/stop (with the partial answer and the stream id), and only
//   then aborts the local fetch. It also names the POST it means (its Idempotency-Key and the
//   id of the message it sent): pressed before the POST reached the server, the stop still
//   stops that answer (outcome "stopped_before_start").
// - NEVER call the stop route on unload, pagehide, visibilitychange, unmount or navigation:
//   those are disconnects, and the answer must go on so that the next page load can resume it.
//   That is why this page registers no such handlers at all.
// - A gateway in JWT mode (`--auth jwt`) needs `Authorization: Bearer <token>` on every /api call:
//   open the page as /#token=<JWT> (the fragment never reaches a server, and the page removes it
//   from the address at once) or paste the token in the token field. It is kept in this tab's
//   sessionStorage only.

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), chatId: $("chat-id"), list: $("messages"), error: $("error"),
  form: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  chunks: $("chunks"), delay: $("delay"), token: $("token"),
};

function randomId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const url = new URL(location.href);
// The sign-in token, for a gateway that asks for one.
const TOKEN_KEY = "stream-relay-token";
const fragment = new URLSearchParams(url.hash.slice(1));
if (fragment.has("token")) {
  sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
  url.hash = "";
}
ui.token.value = sessionStorage.getItem(TOKEN_KEY) || "";
ui.token.addEventListener("change", () => {
  sessionStorage.setItem(TOKEN_KEY, ui.token.value.trim());
  location.reload();  // load the chat again as the new subject
});

function authHeaders(extra = {}) {
  const token = ui.token.value.trim();
  return token ? { ...extra, authorization: `Bearer ${token}` } : extra;
}

// The chat id lives in the URL, so a reload keeps the chat.
let chatId = url.searchParams.get("chat");
if (!chatId) chatId = randomId("chat_");
url.searchParams.set("chat", chatId);
if (url.href !== location.href) history.replaceState(null, "", url);
ui.chatId.textContent = chatId;
const api = "/api/chat/" + encodeURIComponent(chatId);

let messages = [];   // UI messages: {id, role, parts, metadata?}
let current = null;  // the answer being streamed: {controller, streamId, messageId, stopping,
                     // requestId and replyTo: the POST it comes from and the message it answers}

// ---- rendering ----------------------------------------------------------------------------

function setStatus(status) {
  ui.status.dataset.status = status;
  ui.status.textContent = status;
  const streaming = status === "streaming";
  ui.send.disabled = streaming;
  ui.stop.disabled = !streaming || !current || current.stopping;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function messageElement(message) {
  let li = ui.list.querySelector(`li[data-message-id="${CSS.escape(message.id)}"]`);
  if (!li) {
    li = document.createElement("li");
    li.className = "msg";
    li.setAttribute("data-testid", "message");
    li.dataset.messageId = message.id;
    const role = document.createElement("span");
    role.className = "role";
    const text = document.createElement("div");
    text.className = "text";
    text.setAttribute("data-testid", "message-text");
    // Why an answer ended, when it did not complete: the relay says so in the persisted
    // message's metadata.streamEnd, so a reloaded page shows it too.
    const end = document.createElement("span");
    end.className = "end";
    end.setAttribute("data-testid", "message-end");
    li.append(role, text, end);
  }
  return li;
}

function endLabel(message) {
  const end = message.metadata && message.metadata.streamEnd;
  if (!end || typeof end !== "object") return "";
  if (end.state === "failed") return end.error ? `failed: ${end.error}` : "failed";
  if (end.state === "stopped" || end.state === "interrupted") return end.state;
  return "";
}

function renderMessage(message) {
  const li = messageElement(message);
  li.dataset.role = message.role;
  li.dataset.streaming = String(Boolean(current && current.messageId === message.id));
  li.querySelector(".role").textContent = message.role;
  const paragraphs = [];
  for (const part of message.parts) {
    if (part.type !== "text" && part.type !== "reasoning") continue;
    const p = document.createElement("p");
    if (part.type === "reasoning") p.className = "reasoning";
    p.textContent = part.text;
    paragraphs.push(p);
  }
  li.querySelector(".text").replaceChildren(...paragraphs);
  const label = endLabel(message);
  const end = li.querySelector(".end");
  end.textContent = label;
  end.hidden = !label;
  if (label) li.dataset.end = message.metadata.streamEnd.state; else delete li.dataset.end;
  return li;
}

function render() {
  // Keyed by message id: an element is reused, never duplicated, and follows the array's order.
  const keep = messages.map(renderMessage);
  ui.list.replaceChildren(...keep);
  ui.list.lastElementChild?.scrollIntoView({ block: "nearest" });
}

// ---- HTTP ---------------------------------------------------------------------------------

async function errorText(response) {
  const body = await response.text();
  try {
    const parsed = JSON.parse(body);
    if (response.status === 401) {
      const why = parsed?.error?.message || "a token is needed";
      return `sign in: ${why} (paste a token in the token field)`;
    }
    if (parsed && parsed.error && parsed.error.message) return parsed.error.message;
  } catch (_) { /* not JSON: show it as it is */ }
  return body || `HTTP ${response.status}`;
}

async function loadMessages() {
  const response = await fetch(api + "/messages", { cache: "no-store", headers: authHeaders() });
  if (!response.ok) throw new Error(await errorText(response));
  messages = (await response.json()).messages;
  render();
}

// ---- the UI message stream ----------------------------------------------------------------

function applyChunk(state, chunk) {
  const find = () => messages.find((m) => m.id === state.messageId);
  let message = state.messageId ? find() : null;
  if (chunk.type === "start") {
    // A replayed stream starts over: reset the message (persisted or half-streamed copy, same
    // id) so no text ever appears twice.
    state.messageId = chunk.messageId || state.messageId || randomId("msg_");
    state.open = new Map();
    const fresh = { id: state.messageId, role: "assistant", parts: [] };
    if (chunk.messageMetadata) fresh.metadata = chunk.messageMetadata;
    const at = messages.findIndex((m) => m.id === state.messageId);
    if (at >= 0) messages[at] = fresh; else messages.push(fresh);
    return fresh;
  }
  if (!message) {  // a stream without `start`: give the answer an id of its own
    state.messageId = randomId("msg_");
    message = { id: state.messageId, role: "assistant", parts: [] };
    messages.push(message);
  }
  const kind = chunk.type;
  if (kind === "start-step") {
    message.parts.push({ type: "step-start" });
  } else if (kind === "text-start" || kind === "reasoning-start") {
    const part = { type: kind.replace("-start", ""), text: "", state: "streaming" };
    message.parts.push(part);
    state.open.set(part.type + ":" + chunk.id, part);
  } else if (kind === "text-delta" || kind === "reasoning-delta") {
    const part = state.open.get(kind.replace("-delta", "") + ":" + chunk.id);
    if (!part) throw new Error(`a ${kind} for part ${chunk.id} arrived before its start`);
    part.text += chunk.delta;
  } else if (kind === "text-end" || kind === "reasoning-end") {
    const key = kind.replace("-end", "") + ":" + chunk.id;
    const part = state.open.get(key);
    if (part) part.state = "done";
    state.open.delete(key);
  } else if (kind === "finish") {
    state.finished = true;
    if (chunk.messageMetadata) message.metadata = { ...message.metadata, ...chunk.messageMetadata };
  } else if (kind === "abort") {
    state.aborted = true;
  } else if (kind === "error") {
    state.errorText = chunk.errorText || "the stream failed";
  }
  // finish-step, tools, sources, files, data parts: nothing to show in this demo.
  return message;
}

async function readStream(response, state) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;               // `id:` lines and `: keep-alive` comments
      if (data === "[DONE]") { state.done = true; continue; }
      if (state.stopping) continue;      // Stop was pressed: the answer stays as the user saw it
      const li = renderMessage(applyChunk(state, JSON.parse(data)));
      if (!li.isConnected) render();
    }
  }
}

// Streams a POST /api/chat or GET .../stream answer into the chat, then sets the status.
// `eager`: show "streaming" (and allow Stop) before the answer's response arrives.
async function follow(request, { eager, onResponse, requestId = null, replyTo = null }) {
  const controller = new AbortController();
  const state = {
    controller, streamId: null, messageId: null, stopping: false, open: new Map(), requestId,
    replyTo,
  };
  current = state;
  if (eager) setStatus("streaming");
  showError("");
  let outcome = "ready";
  try {
    const response = await request(controller.signal);
    onResponse?.(response.status);
    if (response.status === 204) return 204;
    if (!response.ok) {  // refused: nothing was started (or there is nothing to resume)
      const message = await errorText(response);
      if (!state.stopping) { outcome = "error"; showError(message); }
      return response.status;
    }
    // The stream's id, when the gateway tells it: the stop route then cancels only this answer.
    state.streamId = response.headers.get("x-stream-id");
    setStatus("streaming");
    await readStream(response, state);
    if (state.stopping) return response.status;
    if (state.errorText) throw new Error(state.errorText);
    if (state.aborted) {  // stopped elsewhere (another tab, an API call)
      outcome = "stopped";
      // The relay persisted the answer before the stream ended: show it as kept, with why.
      await loadMessages().catch(() => {});
    } else if (!state.done) throw new Error("the connection was lost; reload the page to resume");
    return response.status;
  } catch (error) {
    if (state.stopping) return 0;   // our own abort, after the stop route answered
    outcome = "error";
    showError(error.message || String(error));
    return 0;
  } finally {
    if (current === state) {
      current = null;
      if (!state.stopping) setStatus(outcome);
      render();
    }
  }
}

function assistantSnapshot(id) {
  const message = messages.find((m) => m.id === id);
  if (!message) return null;
  const parts = message.parts.map((p) => ({ ...p, ...(p.state ? { state: "done" } : {}) }));
  return { id: message.id, role: "assistant", parts, ...(message.metadata ? { metadata: message.metadata } : {}) };
}

async function stop() {
  const state = current;
  if (!state || state.stopping) return;
  state.stopping = true;   // from now on the answer stays exactly as the user saw it
  ui.stop.disabled = true;
  const body = {};
  const partial = state.messageId && assistantSnapshot(state.messageId);
  if (partial) body.assistantMessage = partial;
  if (state.streamId) body.activeStreamId = state.streamId;
  // The POST this answer comes from, which may still be on its way to the server.
  if (state.requestId) body.requestId = state.requestId;
  if (state.replyTo) body.messageId = state.replyTo;
  let status = "stopped";
  let result = null;
  try {
    // FIRST tell the server (the explicit cancel) ...
    const response = await fetch(api + "/stop", {
      method: "POST",
      headers: authHeaders({ "content-type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorText(response));
    result = await response.json();
  } catch (error) {
    status = "error";
    showError("stop failed: " + (error.message || String(error)));
  } finally {
    // ... THEN abort the local fetch.
    state.controller.abort();
  }
  if (current === state) current = null;
  if (result && result.message) {
    // The stop's receipt carries the answer as persisted (with why it ended): keep that copy,
    // so the label shows now and the next message sends it back as the server has it.
    const at = messages.findIndex((m) => m.id === result.message.id || m.id === state.messageId);
    if (at >= 0) messages[at] = result.message;
  }
  render();
  setStatus(status);
  if (result && !result.stopped) {
    // The answer had already ended (or another one is active): show what the server kept.
    await loadMessages().catch((error) => showError(error.message));
  }
}

async function send(text) {
  const user = { id: randomId("u_"), role: "user", parts: [{ type: "text", text }] };
  messages.push(user);
  render();
  const options = {};
  if (ui.chunks.value) options.chunks = ui.chunks.value;
  if (ui.delay.value) options.delay_ms = ui.delay.value;
  const requestId = randomId("req_");  // names this POST for a Stop that may overtake it
  const status = await follow((signal) => fetch("/api/chat", {
    method: "POST",
    headers: authHeaders({ "content-type": "application/json", "idempotency-key": requestId }),
    body: JSON.stringify({ id: chatId, messages, trigger: "submit-message", options }),
    signal,
  }), { eager: true, requestId, replyTo: user.id });
  if (status >= 400) {  // the gateway refused the message: take it back, so it can be fixed
    messages = messages.filter((m) => m !== user);
    render();
    if (!ui.input.value) ui.input.value = text;
  }
}

async function init() {
  try {
    await loadMessages();
  } catch (error) {
    setStatus("error");
    showError(error.message || String(error));
    return;
  }
  // Resume once, like useChat({ resume: true }): 204 means no answer is running.
  const status = await follow(
    (signal) => fetch(api + "/stream", { signal, cache: "no-store", headers: authHeaders() }),
    { eager: false, onResponse: (code) => { document.body.dataset.resume = String(code); } },
  );
  if (status === 204 && messages.at(-1)?.role === "user") {
    // The answer may have ended between the two requests: it is persisted by now.
    await loadMessages().catch((error) => showError(error.message));
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text || current) return;
  ui.input.value = "";
  send(text);
});
ui.stop.addEventListener("click", () => { stop(); });

ui.input.focus();
init().finally(() => { document.body.dataset.settled = "true"; });
