// Plays one conformance scenario (conformance/scenarios.mjs: the kit's, not a copy) with the real
// AI SDK chat client against the gateway, for tests/test_ai_sdk_e2e.py.
//
//   node chat-driver.mjs <gateway url> <scenario> [client: ai5 | ai6 | ai7, default ai5]
//                        [JSON merged into each POST body]
//
// With GATEWAY_TOKEN in the environment (a gateway in JWT mode), every request carries it as
// `Authorization: Bearer`. The npm packages are conformance/'s (node_modules there).
//
// Prints one JSON object on stdout: what the client saw (its status, its messages, every
// onFinish, every HTTP exchange with the raw response body) and the kit's verdict (`check`:
// status pass / fail / skip and the first failing check). The pytest side asserts the verdict
// and, knowing the echo producer, the exact answers.

import { loadClient } from "../../../conformance/harness.mjs";
import { SCENARIOS, play } from "../../../conformance/scenarios.mjs";

const [url, scenario, client = "ai5", body = "{}"] = process.argv.slice(2);
if (!url || !(scenario in SCENARIOS)) {
  process.stderr.write(
    `usage: node chat-driver.mjs <gateway url> <scenario> [client] [body JSON]\n` +
      `scenarios: ${Object.keys(SCENARIOS).join(", ")}\n`,
  );
  process.exit(2);
}
const { ai, version } = await loadClient(client);
const token = process.env.GATEWAY_TOKEN || "";
const headers = token ? { authorization: `Bearer ${token}` } : {};
const { status, failure, report } = await play(scenario, { url, ai, headers, body: JSON.parse(body) });
report.scenario = scenario;
report.aiVersion = version;
report.check = { status, failure };
process.stdout.write(`${JSON.stringify(report)}\n`, () => process.exit(0));
