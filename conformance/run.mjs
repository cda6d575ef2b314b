#!/usr/bin/env node
// The conformance kit: plays the AI SDK chat scenarios (scenarios.mjs) with the real client,
// each supported major of `ai`, against any server implementing the chat routes, and prints a
// pass/fail table. Exit status 0 only if no scenario failed.
//
//   node conformance/run.mjs <base url> [--clients ai5,ai6,ai7] [--only scenario,...]
//        [--json] [--body '<JSON merged into each POST body>'] [--header 'name: value']...
//        [--jobs N] [--list]

import { CLIENTS, loadClient, transcript } from "./harness.mjs";
import { SCENARIOS, play } from "./scenarios.mjs";

const USAGE = `usage: node conformance/run.mjs <base url> [options]

  --clients ai5,ai6,ai7   the AI SDK majors to drive (default: all three)
  --only a,b,...          only these scenarios (default: all; --list names them)
  --body '<JSON>'         merged into every POST body (e.g. your server's options for a long,
                          slow answer: {"options":{"delay_ms":"20"}} for stream-relay's echo)
  --header 'name: value'  sent on every request (repeatable; e.g. authorization)
  --jobs N                scenarios played at once (default: one per client)
  --json                  print the results as JSON instead of a table
  --list                  list the scenarios and exit
`;

function parse(argv) {
  const options = { clients: Object.keys(CLIENTS), only: null, body: {}, headers: {}, json: false };
  const rest = [...argv];
  const value = (flag) => {
    if (!rest.length) throw new Error(`${flag} needs a value`);
    return rest.shift();
  };
  while (rest.length) {
    const arg = rest.shift();
    if (arg === "--clients") options.clients = value(arg).split(",").filter(Boolean);
    else if (arg === "--only") options.only = value(arg).split(",").filter(Boolean);
    else if (arg === "--json") options.json = true;
    else if (arg === "--list") options.list = true;
    else if (arg === "--jobs") options.jobs = Number(value(arg));
    else if (arg === "--body") {
      const body = JSON.parse(value(arg));
      if (body === null || typeof body !== "object" || Array.isArray(body)) {
        throw new Error("--body must be a JSON object");
      }
      options.body = { ...options.body, ...body };
    } else if (arg === "--header") {
      const header = value(arg);
      const colon = header.indexOf(":");
      if (colon < 1) throw new Error(`--header wants 'name: value', got ${header}`);
      options.headers[header.slice(0, colon).trim().toLowerCase()] = header.slice(colon + 1).trim();
    } else if (arg === "-h" || arg === "--help") options.help = true;
    else if (arg.startsWith("-")) throw new Error(`unknown option ${arg}`);
    else if (options.url === undefined) options.url = arg.replace(/\/+$/, "");
    else throw new Error(`unexpected argument ${arg}`);
  }
  for (const client of options.clients) {
    if (!(client in CLIENTS)) throw new Error(`unknown client ${client}; known: ${Object.keys(CLIENTS)}`);
  }
  for (const name of options.only ?? []) {
    if (!(name in SCENARIOS)) throw new Error(`unknown scenario ${name}; known: ${Object.keys(SCENARIOS)}`);
  }
  if (options.jobs !== undefined && !(Number.isInteger(options.jobs) && options.jobs > 0)) {
    throw new Error("--jobs wants a whole number of at least 1");
  }
  return options;
}

/** Runs `tasks` (functions returning promises), at most `jobs` at once. */
async function pool(tasks, jobs) {
  const results = new Array(tasks.length);
  let next = 0;
  const worker = async () => {
    while (next < tasks.length) {
      const i = next++;
      results[i] = await tasks[i]();
    }
  };
  await Promise.all(Array.from({ length: Math.min(jobs, tasks.length) }, worker));
  return results;
}

function table(results, scenarios, clients, versions) {
  const head = ["scenario", ...clients.map((c) => `${c} (${versions[c] ?? "?"})`)];
  const rows = scenarios.map((name) => [
    name,
    ...clients.map((c) => results.find((r) => r.scenario === name && r.client === c).status.toUpperCase()),
  ]);
  const widths = head.map((_, i) => Math.max(...[head, ...rows].map((row) => row[i].length)));
  const line = (row) => row.map((cell, i) => cell.padEnd(widths[i])).join("  ").trimEnd();
  const out = [line(head), line(widths.map((w) => "-".repeat(w))), ...rows.map(line)];
  const failed = results.filter((r) => r.status === "fail");
  const skipped = results.filter((r) => r.status === "skip");
  if (failed.length) {
    out.push("", "Failures (the first failing check):");
    for (const r of failed) out.push(`  ${r.scenario} / ${r.client}: ${r.failure}`);
  }
  if (skipped.length) {
    out.push("", "Skipped:");
    for (const r of skipped) out.push(`  ${r.scenario} / ${r.client}: ${r.failure}`);
  }
  const passed = results.length - failed.length - skipped.length;
  out.push("", `${passed} passed, ${failed.length} failed, ${skipped.length} skipped`);
  return out.join("\n");
}

async function main() {
  let options;
  try {
    options = parse(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (options.list) {
    process.stdout.write(`${Object.keys(SCENARIOS).join("\n")}\n`);
    return 0;
  }
  if (!options.url) {
    process.stderr.write(USAGE);
    return 2;
  }
  const scenarios = options.only ?? Object.keys(SCENARIOS);
  const loaded = {};
  for (const client of options.clients) loaded[client] = await loadClient(client);
  const versions = Object.fromEntries(options.clients.map((c) => [c, loaded[c].version]));
  const tasks = [];
  for (const name of scenarios) {
    for (const client of options.clients) {
      tasks.push(async () => {
        const began = performance.now();
        const { status, failure, report } = await play(name, {
          url: options.url,
          ai: loaded[client].ai,
          headers: options.headers,
          body: options.body,
        });
        const result = {
          scenario: name,
          client,
          version: versions[client],
          status,
          failure,
          seconds: Math.round(performance.now() - began) / 1000,
        };
        if (status === "fail") result.transcript = transcript(report);
        if (!options.json && process.stderr.isTTY) {
          process.stderr.write(`${status.toUpperCase().padEnd(4)} ${name} / ${client}\n`);
        }
        return result;
      });
    }
  }
  const results = await pool(tasks, options.jobs ?? options.clients.length);
  const failed = results.filter((r) => r.status === "fail").length;
  const skipped = results.filter((r) => r.status === "skip").length;
  if (options.json) {
    const summary = {
      base: options.url,
      clients: versions,
      scenarios,
      passed: results.length - failed - skipped,
      failed,
      skipped,
      ok: failed === 0,
      results,
    };
    process.stdout.write(`${JSON.stringify(summary)}\n`);
  } else {
    process.stdout.write(`${table(results, scenarios, options.clients, versions)}\n`);
  }
  return failed === 0 ? 0 : 1;
}

const code = await main();
process.stdout.write("", () => process.exit(code));
