#!/usr/bin/env bash
# Keeps the RocksDB archive that the first build compiled, so that later builds link it instead of
# compiling RocksDB again (see ROCKSDB_KEPT in the Makefile). Does nothing once it is kept.
set -euo pipefail

target_dir=$1
kept_dir=$2

if [[ -f "$kept_dir/librocksdb.a" ]]; then
    exit 0
fi
archive=$(ls -t "$target_dir"/release/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -n 1 || true)
if [[ -z "$archive" ]]; then
    exit 0
fi
mkdir -p "$kept_dir"
cp "$archive" "$kept_dir/librocksdb.a.partial"
mv "$kept_dir/librocksdb.a.partial" "$kept_dir/librocksdb.a"
echo "kept $archive as $kept_dir/librocksdb.a"
