#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs format, lint and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

tools/deps.sh

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test "$@"
