#!/usr/bin/env bash
# Checks, as root, that the .deb's postinst leaves the config 0640 root:storekeyd: dpkg installs
# it root:root, and the service must read it while others must not. Runs the postinst against a
# throwaway root (DPKG_ROOT) holding the sysusers file and the config as dpkg would leave them.
# Usage (as root): deploy/check-postinst.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "check-postinst.sh: needs root (it changes file groups)"; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/lib/sysusers.d" "$root/etc/storekeyd"
cp deploy/storekeyd.sysusers "$root/usr/lib/sysusers.d/storekeyd.conf"
install -m 0640 -o root -g root config/storekeyd.example.toml "$root/etc/storekeyd/storekeyd.toml"
# chgrp resolves the group on this host: make sure it exists here too.
systemd-sysusers "$PWD/deploy/storekeyd.sysusers"
DPKG_ROOT="$root" sh deploy/debian/postinst configure
got=$(stat -c '%a %U:%G' "$root/etc/storekeyd/storekeyd.toml")
if [ "$got" != "640 root:storekeyd" ]; then
  echo "postinst left the config $got, expected 640 root:storekeyd"
  exit 1
fi
grep -q '"etc/storekeyd/storekeyd.toml", "640"' Cargo.toml || {
  echo "Cargo.toml's deb assets must install the config mode 640"
  exit 1
}
echo "postinst: config 640 root:storekeyd"
