# Build, test and demo entry points. Each target installs its own prerequisites.
#
# The Cargo build directory lives outside the clone (CARGO_TARGET_DIR) so that fresh clones on the
# same machine, such as CI runs, reuse compiled dependencies: a cold release build of RocksDB,
# tonic and the rest takes 40 minutes or more on 2 cores.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/sigil/target-ws
export PATH := $(HOME)/.cache/sigil/venv/bin:$(HOME)/.cargo/bin:$(PATH)
SIGIL := $(CARGO_TARGET_DIR)/release/sigil

# RocksDB's C++ library is compiled once and kept beside the build folder. Cargo compiles a -sys
# crate's C++ sources again whenever the features of its build tools change (adding a crate can do
# that), which takes 30 minutes or more on 2 cores; linking the kept archive avoids it.
ROCKSDB_KEPT := $(HOME)/.cache/sigil/rocksdb-11.8.1
ifneq ($(wildcard $(ROCKSDB_KEPT)/librocksdb.a),)
export ROCKSDB_LIB_DIR := $(ROCKSDB_KEPT)
export ROCKSDB_STATIC := 1
endif

.PHONY: all prereqs build demo test bench lint clean-dev

all: build

prereqs:
	@scripts/install-prereqs.sh

build: prereqs
	cargo build --release --workspace --bins
	@scripts/keep-rocksdb.sh "$(CARGO_TARGET_DIR)" "$(ROCKSDB_KEPT)"

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
