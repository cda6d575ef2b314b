// relay.v1 of producer.proto, loaded at runtime (no code generation), for model.mjs and
// server.mjs: the simulated model serves ProducerService, the peer's route calls it.

import { fileURLToPath } from "node:url";
import path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTOS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");
const definition = protoLoader.loadSync("relay/v1/producer.proto", {
  includeDirs: [PROTOS],
  keepCase: true,
  longs: String,
  defaults: true,
});

export { grpc };
export const relay = grpc.loadPackageDefinition(definition).relay.v1;
