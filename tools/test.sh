#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs format, lint and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
  else
    echo "tools/test.sh: missing packages: ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
fi

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test "$@"
