// Drives the gateway's demo page in headless Chromium: send, reload mid-answer (the answer must
// resume and appear once), then send again and Stop mid-answer, then reload (nothing to resume).
//
//   node demo.mjs <gateway url> <screenshot path>
//
// With GATEWAY_TOKEN in the environment (a gateway in JWT mode) the page is opened as
// /#token=<JWT>, as a sign-in redirect would; the page must send it on every /api request.
//
// Prints one JSON object of observations on stdout; tests/test_browser.py asserts on them. Steps
// that cannot go on (a wait that timed out) end the run with {"failed": "<step>: <reason>"}.

import { chromium } from "playwright-core";

const [baseUrl, screenshotPath] = process.argv.slice(2);
if (!baseUrl || !screenshotPath) {
  console.error("usage: node demo.mjs <gateway url> <screenshot path>");
  process.exit(2);
}

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const TOKEN = process.env.GATEWAY_TOKEN || "";
const WAIT_MS = 20_000;
const OPTIONS = { chunks: 60, delayMs: 60 };
const FIRST = "hello relay world";
const SECOND = "please stop here";
const THIRD = "stop me before you start";

/** The echo producer's answer: "You said: <text>", one word per delta, repeated to `chunks`. */
function echo(text, chunks) {
  const words = `You said: ${text}`.split(/\s+/);
  return Array.from({ length: chunks }, (_, i) => words[i % words.length]).join(" ");
}

const result = { steps: [], pageErrors: [], consoleErrors: [], requests: [] };
let step = "launch";
const mark = (name) => {
  step = name;
  result.steps.push(name);
};

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

try {
  const context = await browser.newContext({ viewport: { width: 900, height: 720 } });
  // On every page load: record each assistant text the DOM ever shows, so a duplicate that
  // appears only for a moment (e.g. a replay appended to a half-streamed copy) is caught too.
  await context.addInitScript(() => {
    window.__seen = [];
    window.__maxAssistants = 0;
    const record = () => {
      const nodes = document.querySelectorAll('[data-testid="message"][data-role="assistant"]');
      window.__maxAssistants = Math.max(window.__maxAssistants, nodes.length);
      for (const node of nodes) {
        const text = node.querySelector('[data-testid="message-text"]').textContent;
        const last = window.__seen.findLast((s) => s.id === node.dataset.messageId);
        if (!last || last.text !== text) window.__seen.push({ id: node.dataset.messageId, text });
      }
    };
    new MutationObserver(record).observe(document, {
      subtree: true, childList: true, characterData: true, attributes: true,
    });
  });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on("pageerror", (error) => result.pageErrors.push(String(error)));
  page.on("console", (message) => {
    if (message.type() === "error") result.consoleErrors.push(message.text());
  });
  page.on("request", (request) => {
    const path = new URL(request.url()).pathname;
    if (path.startsWith("/api/")) {
      const headers = request.headers();
      result.requests.push({
        method: request.method(),
        path,
        body: request.postData(),
        // The token's presence only, never its value.
        authorized: TOKEN !== "" && headers.authorization === `Bearer ${TOKEN}`,
        contentType: headers["content-type"] ?? null,
        idempotencyKey: headers["idempotency-key"] ?? null,
      });
    }
  });

  const status = () => page.getByTestId("status").getAttribute("data-status");
  const assistants = () => page.locator('[data-testid="message"][data-role="assistant"]');
  const users = () => page.locator('[data-testid="message"][data-role="user"]');
  const texts = (locator) => locator.locator('[data-testid="message-text"]').allTextContents();
  // Each message's "why it ended" label ("" when it has none, or it is hidden).
  const endLabels = (locator) =>
    locator.evaluateAll((nodes) =>
      nodes.map((n) => {
        const end = n.querySelector('[data-testid="message-end"]');
        return end && !end.hidden ? end.textContent : "";
      }),
    );
  const seen = () => page.evaluate(() => ({ seen: window.__seen, max: window.__maxAssistants }));
  const waitStatus = (value) =>
    page.waitForFunction(
      (v) => document.querySelector('[data-testid="status"]')?.dataset.status === v,
      value,
    );
  // Until the `index`-th assistant message shows at least `count` words.
  const wordsAtLeast = (index, count) =>
    page.waitForFunction(
      ([i, n]) => {
        const nodes = document.querySelectorAll('[data-testid="message"][data-role="assistant"]');
        const text = nodes[i]?.querySelector('[data-testid="message-text"]').textContent.trim();
        return Boolean(text) && text.split(/\s+/).length >= n;
      },
      [index, count],
    );
  // The page's single resume call on load, observed on the wire.
  const resumeResponse = () =>
    page.waitForResponse((r) => /\/api\/chat\/[^/]+\/stream$/.test(new URL(r.url()).pathname));
  const load = async (action) => {
    const resumed = resumeResponse();
    await action();
    const response = await resumed;
    await page.waitForSelector("body[data-resume]");
    return response.status();
  };

  // 1. A fresh page: a chat id is made up and put in the URL.
  mark("open");
  const start = TOKEN ? `${baseUrl}/#token=${encodeURIComponent(TOKEN)}` : `${baseUrl}/`;
  result.firstResume = await load(() => page.goto(start));
  result.tokenLeftInUrl = page.url().includes("token");
  result.chatId = new URL(page.url()).searchParams.get("chat");
  result.shownChatId = await page.getByTestId("chat-id").textContent();
  result.initialStatus = await status();

  // 2. A refused request shows the gateway's error message and takes the message back.
  mark("refused");
  await page.getByTestId("chunks").fill("0");
  await page.getByTestId("input").fill(FIRST);
  await page.getByTestId("send").click();
  await waitStatus("error");
  result.refused = {
    error: await page.getByTestId("error").textContent(),
    messages: await page.getByTestId("message").count(),
    input: await page.getByTestId("input").inputValue(),
  };

  // 3. Send; reload while the answer streams.
  mark("send first");
  await page.getByTestId("chunks").fill(String(OPTIONS.chunks));
  await page.getByTestId("delay").fill(String(OPTIONS.delayMs));
  await page.getByTestId("input").fill(FIRST);
  await page.getByTestId("send").click();
  await waitStatus("streaming");
  result.stopEnabledWhileStreaming = await page.getByTestId("stop").isEnabled();
  await wordsAtLeast(0, 8);
  result.expectedFirst = echo(FIRST, OPTIONS.chunks);
  result.beforeReload = (await texts(assistants()))[0];
  result.seenBeforeReload = await seen();

  mark("reload mid-answer");
  // The reloaded page also gets, in its /messages, a half-streamed copy of the live answer under
  // the same message id: what a page sees when the answer is persisted between its two calls.
  // The resumed stream replays from `start`, which must replace that copy, never add to it.
  const liveId = await assistants().first().getAttribute("data-message-id");
  result.liveId = liveId;
  const messagesRoute = /\/api\/chat\/[^/]+\/messages$/;
  await page.route(messagesRoute, async (route) => {
    const response = await route.fetch();
    const body = await response.json();
    result.persistedAtReload = body.messages.map((m) => m.role);
    body.messages.push({
      id: liveId,
      role: "assistant",
      parts: [{ type: "text", text: result.beforeReload }],
    });
    await route.fulfill({ response, json: body });
  }, { times: 1 });
  result.resumeAfterReload = await load(() => page.reload());
  await page.unroute(messagesRoute);
  result.chatIdAfterReload = new URL(page.url()).searchParams.get("chat");
  // The page sets its status as the resume response arrives: "streaming" for a 200.
  result.statusAfterReload = await status();
  await page.waitForSelector("body[data-settled]");
  await waitStatus("ready");
  result.afterResume = {
    assistants: await texts(assistants()),
    users: await texts(users()),
    ids: await assistants().evaluateAll((nodes) => nodes.map((n) => n.dataset.messageId)),
    seen: await seen(),
  };

  // 4. Send again; Stop mid-answer: the answer must stop growing.
  mark("send second");
  await page.getByTestId("input").fill(SECOND);
  await page.getByTestId("send").click();
  await waitStatus("streaming");
  await wordsAtLeast(1, 8);
  result.expectedSecond = echo(SECOND, OPTIONS.chunks);

  mark("stop");
  const stopResponse = page.waitForResponse(
    (r) => r.request().method() === "POST" && new URL(r.url()).pathname.endsWith("/stop"),
  );
  await page.getByTestId("stop").click();
  const stopped = await stopResponse;
  result.stopHttpStatus = stopped.status();
  result.stopRequest = JSON.parse(stopped.request().postData() || "{}");
  result.stopResult = await stopped.json();
  await waitStatus("stopped");
  result.stopEnabledAfterStop = await page.getByTestId("stop").isEnabled();
  result.textAtStop = (await texts(assistants()))[1];
  // The one fixed wait: at one word per 60 ms an answer still growing would gain ~25 words.
  await page.waitForTimeout(1500);
  result.textAfterWait = (await texts(assistants()))[1];
  result.statusAfterWait = await status();
  result.afterStop = {
    assistants: await texts(assistants()),
    endLabels: await endLabels(assistants()),
    seen: await seen(),
  };

  // 5. Reload: nothing is running any more, so the resume call gets 204.
  mark("reload after stop");
  result.resumeAfterStop = await load(() => page.reload());
  await page.waitForSelector("body[data-settled]");
  result.statusAfterStopReload = await status();
  result.streamingElements = await page.locator('[data-streaming="true"]').count();
  result.afterStopReload = {
    assistants: await texts(assistants()),
    users: await texts(users()),
    endLabels: await endLabels(assistants()),
    error: await page.getByTestId("error").isVisible(),
  };
  await page.screenshot({ path: screenshotPath, fullPage: true });
  result.screenshot = screenshotPath;

  // 6. Stop pressed while the POST is still on its way: the POST is held in the browser until
  //    the stop has answered, then sent (by the test, as the page has given up on it). Its
  //    answer must end as it starts.
  mark("stop before start");
  let releasePost;
  const postHeld = new Promise((resolve) => { releasePost = resolve; });
  let postReached;
  const postSeen = new Promise((resolve) => { postReached = resolve; });
  let latePostDone;
  const latePost = new Promise((resolve) => { latePostDone = resolve; });
  await page.route(/\/api\/chat$/, async (route) => {
    postReached();
    await postHeld;
    try {
      const response = await route.fetch();  // the gateway gets the POST only now
      result.lateAnswer = { status: response.status(), body: await response.text() };
      await route.fulfill({ response }).catch(() => {});  // the page aborted it: nobody reads
    } catch (error) {
      result.lateAnswer = { error: String(error) };
    }
    latePostDone();
  }, { times: 1 });
  const earlyStop = page.waitForResponse(
    (r) => r.request().method() === "POST" && new URL(r.url()).pathname.endsWith("/stop"),
  );
  await page.getByTestId("input").fill(THIRD);
  await page.getByTestId("send").click();
  await postSeen;
  await page.getByTestId("stop").click();
  const early = await earlyStop;
  result.earlyStopRequest = JSON.parse(early.request().postData() || "{}");
  result.earlyStop = await early.json();
  releasePost();
  await latePost;
  await waitStatus("stopped");
  mark("done");
} catch (error) {
  result.failed = `${step}: ${error && error.message ? error.message : error}`;
} finally {
  await browser.close();
}

process.stdout.write(JSON.stringify(result) + "\n");
