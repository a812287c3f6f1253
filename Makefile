# Flotilla. `make demo` runs a real job end to end on the local emulator;
# `make test` runs every test. Both install what they need into .venv.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# checkov pins boto3 versions moto and awscli do not share: its own venv.
CHECKOV_VENV := .venv-checkov
CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
BIN := $(CARGO_TARGET_DIR)/debug
FUNCTIONS := intake reconcile tick notify

# The SAM CLI pins its own boto3 and cfn-lint: its own venv, only for package and deploy.
SAM_VENV := .venv-sam
SAM := $(SAM_VENV)/bin/sam
# What the functions are built for: arm64 when this machine's Rust has the
# aarch64 target (cargo lambda cross-compiles with zig), else x86_64. The
# template's Architecture parameter is set to match, so x86_64 binaries
# built here never ship to arm64 functions.
ARCH ?= $(shell rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu && echo arm64 || echo x86_64)

.PHONY: help venv host-tools browser build build-functions test smoke chaos fingerprint fuzz bench lint local-up local-down demo clean dlq redrive package deploy

help:
	@echo "make demo        run the demo job end to end on the local stack"
	@echo "make test        unit, scenario and moto integration tests, cfn-lint, then make smoke"
	@echo "make smoke       local stack end to end: jobs submitted with plain awscli reach their terminal states"
	@echo "make chaos       2,000 seeded simulated jobs + five of 1,000 instances, then 200 lineage worlds; SEED=n or WORLD=n replays one"
	@echo "make fingerprint rewrite the simulator's pinned figures (tests/fingerprint/) after a change meant to alter behaviour"
	@echo "make fuzz        long property runs, then each cargo-fuzz target (nightly) for FUZZ_SECONDS"
	@echo "make bench       release build and Lambda zips, then start-up, API-call, overhead and CPU figures beside their baselines"
	@echo "make local-up    start moto + cargo lambda watch + event pump; writes .flotilla/local.env"
	@echo "make local-down  stop everything local-up started"
	@echo "make dlq         list what the local stack's dead-letter queues hold, with reasons"
	@echo "make redrive     send the local reconcile DLQ's messages back (QUEUE=jobs for the jobs DLQ)"
	@echo "make build       release build (LTO) of every binary"
	@echo "make package     sam build of the four functions for ARCH (arm64 when the aarch64 target is installed, else x86_64)"
	@echo "make deploy      make package, then sam deploy with samconfig.toml (DEPLOY_ARGS=... adds to it)"
	@echo "make lint        rustfmt --check, clippy (warnings are errors, functions within 80 lines), cfn-lint, then checkov and the IAM scope checks on the SAM-expanded template"

venv: $(VENV)/.installed host-tools

# The emulator's real block devices (tools/flotilla_devices.py) need
# mkfs.xfs for its EBS store: installed from Debian's packages when missing
# and this is root. Without it the emulator says so and skips block-device
# scripts; under CI=true it refuses to start.
host-tools:
	@command -v mkfs.xfs >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends xfsprogs >/dev/null; } \
		|| echo "make: mkfs.xfs is missing and could not be installed; the emulator will skip block-device scripts"; }

# The HTML report's test opens it in headless Chromium (tests/integration/see_moto.rs).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| { echo "make: chromium is missing and could not be installed (apt-get install chromium)"; exit 1; }; }

$(VENV)/.installed: tools/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tools/requirements.txt
	touch $@

build:
	cargo build --release --workspace --bins

build-functions:
	cargo build $(foreach f,$(FUNCTIONS),-p $(f)) -p flotilla

$(CHECKOV_VENV)/.installed: tools/requirements-checkov.txt
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check -r tools/requirements-checkov.txt
	touch $@

# checkov reads the SAM-expanded template, so the functions' generated roles
# and their inline policies are checked too; each skip is justified in
# template.yaml. check_policies.py holds the IAM scoping this project needs.
lint: venv $(CHECKOV_VENV)/.installed
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/cfn-lint template.yaml examples/*.yaml
	mkdir -p .flotilla
	$(CHECKOV_VENV)/bin/python tools/sam_transform.py template.yaml .flotilla/template.sam.json
	$(CHECKOV_VENV)/bin/checkov -f .flotilla/template.sam.json --framework cloudformation --skip-download --compact --quiet
	$(CHECKOV_VENV)/bin/python tools/check_policies.py .flotilla/template.sam.json

# Tests start their own moto servers (FLOTILLA_PYTHON tells them which python).
test: venv browser lint
	FLOTILLA_PYTHON=$(CURDIR)/$(PY) cargo test --workspace
	$(MAKE) smoke

# The deterministic simulator at full size; `make test` runs a short variant.
# Single jobs on a fresh cloud each, then lineage worlds (many runs of one
# job name on one cloud, jobs restoring from them, the reaper acting).
# SEED=n replays one single job, WORLD=n one world.
CHAOS_JOBS ?= 2000
CHAOS_BIG ?= 5
CHAOS_WORLDS ?= 200
chaos:
	$(if $(WORLD),,$(if $(SEED),FLOTILLA_SIM_SEED=$(SEED)) FLOTILLA_SIM_JOBS=$(CHAOS_JOBS) FLOTILLA_SIM_BIG=$(CHAOS_BIG) \
		cargo test -p flotilla-tests --test integration scenarios::seeded_simulation -- --nocapture)
	$(if $(SEED),,$(if $(WORLD),FLOTILLA_SIM_WORLD=$(WORLD)) FLOTILLA_SIM_WORLDS=$(CHAOS_WORLDS) \
		cargo test -p flotilla-tests --test integration lineage_sim::lineage_worlds -- --nocapture)

# Rewrite the simulator's pinned figures (tests/fingerprint/) for every seed
# `make chaos` runs. Only for a change meant to alter behaviour: say why in
# the commit.
fingerprint:
	FLOTILLA_FINGERPRINT=write $(MAKE) chaos

# Long runs of the property tests `make test` runs briefly, then each
# cargo-fuzz target (libFuzzer, nightly) for FUZZ_SECONDS. The fuzz crate
# builds the shared crate without its AWS feature, so no SDK is compiled;
# cargo-fuzz is installed into .cargo-tools on first use.
FUZZ_CASES ?= 200000
FUZZ_SECONDS ?= 120
FUZZ_TARGETS := spec quote decide
CARGO_FUZZ_VERSION := 0.13.1
fuzz: .cargo-tools/bin/cargo-fuzz
	FLOTILLA_FUZZ_CASES=$(FUZZ_CASES) cargo test -p flotilla-shared --lib -- spec::tests::parsing spec::tests::validating
	FLOTILLA_FUZZ_CASES=$(FUZZ_CASES) cargo test -p flotilla-tests --test integration -- decide_fuzz
	mkdir -p $(foreach t,$(FUZZ_TARGETS),fuzz/corpus/$(t))
	for target in $(FUZZ_TARGETS); do \
		echo "cargo fuzz: $$target for $(FUZZ_SECONDS) s"; \
		PATH="$(CURDIR)/.cargo-tools/bin:$$PATH" CARGO_TARGET_DIR=$(CURDIR)/fuzz/target \
			cargo +nightly fuzz run --fuzz-dir fuzz $$target fuzz/corpus/$$target $$(ls -d fuzz/seeds/$$target 2>/dev/null) \
			-- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 2>&1 \
			| grep -E "^(stat::number_of_executed_units|stat::peak_rss|Done|==|SUMMARY)|panicked" ; \
		test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

# Figures, not timed tests: start-up (init, peak RSS) against a hello-world
# lambda_runtime binary and a boto3 baseline, zip sizes, then the simulator's
# API calls, throttles, fifty concurrent jobs and overhead, then callgrind's
# instructions per reconcile pass; bench/table.py prints them beside the goals.
# x86_64 here (the aarch64 target cannot be installed on this machine). One
# cargo lambda build for every binary, so the SDK is compiled once (about 25
# minutes on 2 cores with the release profile's fat LTO).
BENCH_RUNS ?= 20
RELEASE := $(CARGO_TARGET_DIR)/x86_64-unknown-linux-gnu/release
bench: venv
	mkdir -p .flotilla
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/cargo-lambda lambda build --release --output-format zip \
		--compiler cargo --x86-64 --lambda-dir $(CARGO_TARGET_DIR)/lambda \
		$(foreach f,$(FUNCTIONS),-p $(f)) -p flotilla-bench-floor -p flotilla-bench-sim
	$(PY) bench/startup.py --bin-dir $(RELEASE) --zip-dir $(CARGO_TARGET_DIR)/lambda --runs $(BENCH_RUNS) \
		--json .flotilla/bench-startup.json
	$(RELEASE)/flotilla-bench-sim --json .flotilla/bench-sim.json
	$(PY) bench/callgrind.py $(RELEASE)/flotilla-bench-sim --json .flotilla/bench-cpu.json 10 1000
	@echo
	$(PY) bench/table.py .flotilla/bench-startup.json .flotilla/bench-sim.json .flotilla/bench-cpu.json

.cargo-tools/bin/cargo-fuzz:
	CARGO_TARGET_DIR=$(CURDIR)/.cargo-tools/target cargo install --locked --quiet cargo-fuzz --version $(CARGO_FUZZ_VERSION) --root $(CURDIR)/.cargo-tools

smoke: venv build-functions
	PATH="$(BIN):$$PATH" bash tools/local_smoke.sh

local-up: venv build-functions
	PATH="$(BIN):$$PATH" $(PY) tools/local_stack.py up

QUEUE ?= reconcile
dlq: build-functions
	$(BIN)/flotilla dlq

redrive: build-functions
	$(BIN)/flotilla redrive --queue $(QUEUE)

local-down:
	@if [ -x $(PY) ]; then $(PY) tools/local_stack.py down; fi

demo: venv build-functions
	PATH="$(BIN):$$PATH" bash tools/demo.sh

clean: local-down
	rm -rf .flotilla

$(SAM_VENV)/.installed: tools/requirements-deploy.txt
	python3 -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet --disable-pip-version-check -r tools/requirements-deploy.txt
	touch $@

# Release builds of the four functions, as SAM lays them out in .aws-sam/
# (BuildMethod rust-cargolambda is a SAM beta feature). Not part of `make
# test`: a release build takes about 25 minutes here.
package: venv $(SAM_VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SAM) build --beta-features --parameter-overrides Architecture=$(ARCH)
	echo $(ARCH) > .aws-sam/flotilla-architecture
	@echo "packaged for $(ARCH); make deploy deploys it with Architecture=$(ARCH)"

# samconfig.toml holds the stack name, region and confirmations; the
# architecture is what `make package` built.
deploy: package
	$(SAM) deploy --config-file samconfig.toml \
		--parameter-overrides Architecture=$$(cat .aws-sam/flotilla-architecture) $(DEPLOY_ARGS)
