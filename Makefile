# Build, test and demo entry points. Each target installs its own prerequisites.
#
# The Cargo build directory lives outside the clone (CARGO_TARGET_DIR) so that fresh clones on the
# same machine, such as CI runs, reuse compiled dependencies: a cold release build of RocksDB,
# tonic and the rest takes 10 to 15 minutes on 2 cores.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/sigil/target
export PATH := $(HOME)/.cache/sigil/venv/bin:$(HOME)/.cargo/bin:$(PATH)
SIGIL := $(CARGO_TARGET_DIR)/release/sigil

.PHONY: all prereqs build demo test bench lint clean-dev

all: build

prereqs:
	@scripts/install-prereqs.sh

build: prereqs
	cargo build --release --bins

demo: build
	scripts/demo.sh "$(SIGIL)"

# SoftHSM loads every token in its folder at start-up, so in-process HSM tests start from an empty
# folder (see .cargo/softhsm2-test.conf).
test: build
	rm -rf /tmp/sigil-test-tokens
	cargo test --release --workspace

bench: build
	cargo bench --bench issuance
	cargo bench --bench load

lint:
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings
