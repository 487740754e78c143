#!/usr/bin/env bash
# Checks deploy/storekeyd.service: the hardening exposure score must be 1.5 or lower, and
# `systemd-analyze verify` must print nothing (it exits 0 even on unknown keys, so any output
# fails the check). Usage: deploy/check-unit.sh PATH-TO-BUILT-BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:?usage: deploy/check-unit.sh PATH-TO-BUILT-BINARY}")
unit=deploy/storekeyd.service

score=$(systemd-analyze security --offline=yes --threshold=15 "$unit" | tail -n 1)
echo "$score"

# verify with the binary "installed" where the unit expects it, and its man page on MANPATH.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|/usr/bin/storekeyd|$bin|" "$unit" > "$tmp/storekeyd.service"
mkdir -p "$tmp/man/man1"
"$bin" man > "$tmp/man/man1/storekeyd.1"
out=$(MANPATH="$tmp/man" systemd-analyze verify "$tmp/storekeyd.service" 2>&1) || { echo "$out"; exit 1; }
if [ -n "$out" ]; then
  echo "systemd-analyze verify reported:"
  echo "$out"
  exit 1
fi
echo "systemd-analyze verify: clean"
