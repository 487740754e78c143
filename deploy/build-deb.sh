#!/usr/bin/env bash
# Builds target/debian/storekeyd_<version>_<arch>.deb: the binary, the systemd unit, the example
# config as /etc/storekeyd/storekeyd.toml, the man page and shell completions.
# Needs cargo-deb: `cargo install cargo-deb --locked`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
mkdir -p target/assets
bin=target/release/storekeyd
"$bin" man > target/assets/storekeyd.1
"$bin" completions bash > target/assets/storekeyd.bash
"$bin" completions zsh > target/assets/_storekeyd
"$bin" completions fish > target/assets/storekeyd.fish
cargo deb --no-build --locked "$@"
