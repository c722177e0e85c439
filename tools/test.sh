#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs format, lint and tests.
#   tools/test.sh          the default run (the minimal guest's boot story included)
#   tools/test.sh --long   also the boot story on the systemd guest, the inventory's diff of
#                          the minimal and systemd guests, the real-libvirt test
#                          (tools/libvirt-test.sh; root) and 3 minutes of the kill -9
#                          campaign (tools/crash-campaign.py) and the hoard's
#                          (tools/hoard-crash.py)
set -euo pipefail
cd "$(dirname "$0")/.."
long=0
if [ "${1:-}" = "--long" ]; then
  long=1
  shift
fi

log=$(mktemp)
# What the run left on disk, however it ends (a run that fails for want of space says so).
disk() { df -P . | awk 'NR == 2 { printf "test.sh: disk: %d MiB used, %d MiB free\n", $3 / 1024, $4 / 1024 }' || true; }
trap 'rm -f "$log"; disk' EXIT

tools/deps.sh --boot
# The test guest for tests/boot.rs (cached under target/images; rebuilt when its recipe changes).
images/build.sh minimal >/dev/null

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
set +e
cargo test --all-targets "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" = 0 ] && [ $long = 1 ]; then
  images/build.sh systemd >/dev/null
  set +e
  VMICACHE_TEST_GUEST=systemd cargo test --release --test boot 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    # The inventory's --diff of the minimal and systemd guests (needs both built).
    cargo test --release --test inventory -- --include-ignored diff_of 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
  fi
  if [ "$rc" = 0 ]; then
    tools/libvirt-test.sh 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
  fi
  if [ "$rc" = 0 ]; then
    # The standing kill -9 campaign (a few minutes): crashes may leave leaks, never more.
    cargo build --release --quiet
    rc=$?
  fi
  if [ "$rc" = 0 ]; then
    python3 tools/crash-campaign.py --binary target/release/vmicache --seconds 180 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
  fi
  if [ "$rc" = 0 ]; then
    # The hoard's writers killed at random: at least 50 kills of each of add and gc.
    python3 tools/hoard-crash.py --binary target/release/vmicache --kills 50 --seconds 900 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
  fi
  set -e
fi
# One summary line over all test binaries (the exit trap adds the disk line after it).
awk '/^(test result:|libvirt: [0-9]+ passed)/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$rc"
