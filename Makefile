# cloudletfs: `make demo` runs the main job end to end, `make test` runs every test.

GO        ?= go
BUILD     ?= build
BIN       := $(BUILD)/cloudletfs
STATICCHECK_VERSION := v0.8.2
# Fuzz budgets are counts, not durations: Go 1.26's fuzz coordinator can
# report a spurious "context deadline exceeded" when a -fuzztime duration
# ends (golang/go#75804).

.PHONY: all build deps demo demo-face face test lint unit fuzz-short fuzz bench bench-face clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/cloudletfs

# System packages the project needs; installs only what is missing.
deps:
	tools/install-deps.sh

# Generate a base and a customized VM, import the base, build the overlay,
# extract it and compare every byte.
demo: deps build
	tools/demo.sh $(BIN) $(BUILD)/demo

# The FACE application VM (Debian bookworm, OpenCV face detection, 1 GiB of
# RAM) end to end: build, base create, capture, launch over a 38 Mbit/s link
# against the baseline. The guest is cached in $(BUILD)/face.
demo-face: deps build
	tools/face/demo.sh $(BIN) $(BUILD)/demo-face

# Build (or reuse) the FACE guest from Debian packages.
face: deps
	tools/face/build.sh $(BUILD)/face

test: deps lint unit fuzz-short

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change: $$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

# The timeout is per package: cmd/cloudletfs holds the end-to-end tests of
# both guests under TCG, the FACE one alone about 15 minutes on 2 busy cores.
unit:
	$(GO) test -count=1 -timeout 45m ./...

# Each fuzz target briefly, for a number of inputs (pkg:target:count);
# `make fuzz` runs each 100 times longer.
FUZZ_TARGETS := ./overlay:FuzzDecodeManifest:100000 ./overlay:FuzzDecompress:20000 \
	./order:FuzzParse:100000 ./fetch:FuzzParseContentRange:100000 ./qemu:FuzzQMPReplies:20000
FUZZSCALE ?= 1
fuzz-short:
	@for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; rest=$${t#*:}; fn=$${rest%%:*}; n=$$(( $${rest##*:} * $(FUZZSCALE) )); \
	  echo "fuzz $$fn ($${n}x)"; \
	  $(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $${n}x $$pkg || exit 1; \
	done

fuzz:
	$(MAKE) fuzz-short FUZZSCALE=100

# Figures for docs/BENCHMARKS.md.
bench: deps build
	tools/bench.sh $(BIN) $(BUILD)/bench
	tools/bench-order.sh $(BIN) $(BUILD)/bench-order
	tools/bench-gap.sh $(BIN) $(BUILD)/bench-gap
	tools/bench-reliability.sh $(BUILD)/bench-reliability
	tools/bench-io.sh $(BIN) $(BUILD)/bench-io
	tools/bench-cloudlet.sh $(BIN) $(BUILD)/bench-cloudlet
	tools/bench-handoff.sh $(BIN) $(BUILD)/bench-handoff

# The FACE VM's figures (two captures and nine launches under TCG: about an
# hour on 2 cores).
bench-face: deps build
	tools/bench-face.sh $(BIN) $(BUILD)/bench-face

clean:
	rm -rf $(BUILD)
