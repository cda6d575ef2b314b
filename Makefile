# stream-relay developer commands. `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
PROTO := protos/relay/v1/relay.proto protos/relay/v1/producer.proto

.PHONY: help setup run run-relay run-cluster test lint proto clients bench bench-quick soak fuzz conformance clean

help:
	@echo "make run    start the relay (127.0.0.1:50051) and the gateway (http://127.0.0.1:8080/)"
	@echo "make run-cluster  two relays on PostgreSQL + Redis, a gateway on each (:8080, :8081)"
	@echo "make test   run the tests"
	@echo "make lint   ruff, mypy and buf lint"
	@echo "make proto  regenerate relay/v1/*_pb2*.py from $(PROTO)"
	@echo "make clients  Go, TypeScript and Java clients into gen/ (buf.gen.yaml; needs buf.build)"
	@echo "make bench  stream-relay, the gRPC ceiling and the peer side by side (minutes)"
	@echo "make bench-quick  a short version of it (under a minute or so)"
	@echo "make soak   concurrent clients, relay SIGKILLs and restarts, every reader checked (~80 s)"
	@echo "make fuzz   schemathesis against a live gateway: no 5xx, responses as documented (~15 s)"
	@echo "make conformance BASE=http://host:port  the AI SDK client (ai 5/6/7) against any server"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m gateway.server --embedded-relay --log-format text

run-relay: $(STAMP)
	$(BIN)/python -m relay.server --log-format text

run-cluster: $(STAMP)
	$(BIN)/python scripts/run_cluster.py

test: $(STAMP)
	$(BIN)/pytest

$(BUF):
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@1

lint: $(STAMP) $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

soak: $(STAMP)
	$(BIN)/python -m soak

fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz_gateway $(FUZZ_ARGS)

# The conformance kit (conformance/): the real AI SDK client against any server with the chat
# routes; CONFORMANCE_ARGS adds run.mjs flags (--body, --only, --clients, --json...).
BASE ?= http://127.0.0.1:8080
CONFORMANCE_NPM := conformance/node_modules/.stream-relay-installed

$(CONFORMANCE_NPM): conformance/package.json
	cd conformance && npm install --silent --no-audit --no-fund --no-package-lock
	touch $@

conformance: $(CONFORMANCE_NPM)
	node conformance/run.mjs $(BASE) $(CONFORMANCE_ARGS)

clients: $(BUF)
	$(BUF) generate

# The messages and stubs, and their typed .pyi (mypy-protobuf): with grpc's own stubs
# (types-grpcio*), mypy checks the servicer against the service and the client's calls too.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. $(PROTO)

clean:
	rm -rf $(VENV) $(TOOLS) data .pytest_cache .mypy_cache .ruff_cache
