# qbridge — see README.md. Tools are pinned and installed into ./bin.
SHELL := /bin/bash
BIN   := $(CURDIR)/bin
export PATH := $(BIN):$(PATH)

BUF_VERSION                := v1.75.0
PROTOC_GEN_GO_VERSION      := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
GRPCURL_VERSION            := v1.9.4

GO_TEST_FLAGS ?=
QBRIDGE_ARGS  ?=

.PHONY: all run build test test-short chaos client-tools bench bench-short generate lint checkgenerate tools clean

all: build

## run: start qbridged (embedded in-memory engine unless QBRIDGE_ARGS gives --redis-url, with --plaintext or TLS)
run:
	go run ./cmd/qbridged $(QBRIDGE_ARGS)

build:
	go build -o $(BIN)/ ./cmd/...

## test: the whole suite, with the race detector, against real redis-server processes
test: $(BIN)/grpcurl
	go test -race -count=1 -timeout 15m $(GO_TEST_FLAGS) ./...

test-short:
	go test -race -count=1 -short ./...

## chaos: the fault-injection suite at full size (go test ./chaos runs it shortened, as part of make test);
## CHAOS_SOAK=30m adds a soak run of that length; summary lines go to chaos-results.txt
chaos:
	rm -f chaos-results.txt
	CHAOS_FULL=1 CHAOS_SUMMARY=$(CURDIR)/chaos-results.txt go test -count=1 -timeout 120m ./chaos; \
	status=$$?; cat chaos-results.txt; exit $$status

## bench: qbridge vs direct go-redis on a private redis-server (table on stdout, JSON in bench-results.json)
bench:
	go run ./cmd/qbench -json bench-results.json $(QBENCH_ARGS)

## bench-short: a quick pass of the same scenarios
bench-short:
	go run ./cmd/qbench -short $(QBENCH_ARGS)

## generate: regenerate gen/ from proto/ (Go with pinned buf plugins; Python with Debian's
## protoc 3.21 and grpc_python_plugin 1.51; JavaScript with protoc-gen-es from package.json;
## `make client-tools` installs the last two)
generate: $(BIN)/buf $(BIN)/protoc-gen-go $(BIN)/protoc-gen-go-grpc
	$(BIN)/buf generate
	@command -v protoc >/dev/null && command -v grpc_python_plugin >/dev/null || { echo "protoc or grpc_python_plugin missing: run 'make client-tools'"; exit 1; }
	$(BIN)/buf generate --template buf.gen.python.yaml
	@test -x node_modules/.bin/protoc-gen-es || { echo "node_modules/.bin/protoc-gen-es missing: run 'make client-tools'"; exit 1; }
	$(BIN)/buf generate --template buf.gen.node.yaml

## client-tools: the toolchains of the generated clients and their tests (Debian packages, and
## the npm packages pinned in package-lock.json into node_modules)
client-tools:
	@if command -v protoc >/dev/null && command -v grpc_python_plugin >/dev/null && /usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null; then \
		echo "client tools present"; \
	else \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			protobuf-compiler protobuf-compiler-grpc python3-grpcio python3-protobuf; \
	fi
	@command -v npm >/dev/null || { echo "npm missing: install Node.js 18+ (apt-get install -y nodejs npm)"; exit 1; }
	npm ci --no-audit --no-fund

## lint: buf lint + buf format check + go vet + generated code up to date
lint: $(BIN)/buf checkgenerate
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code
	go vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go' | grep -v '^gen/'))" || { gofmt -l $$(git ls-files '*.go' | grep -v '^gen/'); echo "gofmt needed"; exit 1; }

checkgenerate: generate
	@git diff --exit-code --stat -- gen || { echo "gen/ is out of date: run 'make generate' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- gen)" || { git status --porcelain -- gen; echo "gen/ has untracked or changed files: run 'make generate' and commit"; exit 1; }

tools: $(BIN)/buf $(BIN)/protoc-gen-go $(BIN)/protoc-gen-go-grpc $(BIN)/grpcurl

$(BIN)/buf:
	GOBIN=$(BIN) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(BIN)/protoc-gen-go:
	GOBIN=$(BIN) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(BIN)/protoc-gen-go-grpc:
	GOBIN=$(BIN) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
$(BIN)/grpcurl:
	GOBIN=$(BIN) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

clean:
	rm -rf $(BIN)
