#!/usr/bin/env bash
# Proves that a game backend running as another Unix user can use storekeyd's database, with the
# user, group, directory mode and umask deploy/storekeyd.service declares. Needs root: it creates
# the system user and group from deploy/storekeyd.sysusers (systemd-sysusers, on the real system;
# harmless and idempotent, and left in place), a backend user `skbackend` in group storekeyd
# (removed at the end), and runs commands as each of them.
#
#   1. storekeyd, under the unit's UMask=, runs `storekeyd migrate` on a fresh database in a
#      directory with the unit's owner and StateDirectoryMode=;
#   2. the backend (umask 0022, group storekeyd as a supplementary group) runs the README's upsert
#      and read with the sqlite3 CLI, and gets its row back;
#   3. the backend keeps a connection open, so the -wal and -shm files are its own, and storekeyd
#      runs `storekeyd add` (a write) through them; the backend then reads that row;
#   4. the database, its -wal and -shm, and the directory: group storekeyd, group read-write,
#      nothing for others.
#
# Usage: deploy/check-backend-access.sh PATH-TO-BUILT-BINARY
# Not root: exits 1 saying why, or 0 with SKIP_ROOT_TESTS=1.
set -euo pipefail
bin_arg=${1:+$(realpath -m -- "$1")}
cd "$(dirname "$0")/.."
repo=$PWD
unit=deploy/storekeyd.service
sysusers=deploy/storekeyd.sysusers
backend=skbackend
backend_umask=0022

fail() { echo "check-backend-access: FAILED: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  if [ "${SKIP_ROOT_TESTS:-}" = 1 ]; then
    echo "check-backend-access: skipped (SKIP_ROOT_TESTS=1; it needs root)"
    exit 0
  fi
  echo "check-backend-access: needs root: it creates system users (systemd-sysusers, useradd) and" >&2
  echo "runs commands as them (setpriv). Run it as root, or set SKIP_ROOT_TESTS=1 to skip it." >&2
  exit 1
fi

[ -n "$bin_arg" ] || fail "usage: deploy/check-backend-access.sh PATH-TO-BUILT-BINARY"
[ -x "$bin_arg" ] || fail "$bin_arg is not an executable file"
for cmd in systemd-sysusers setpriv sqlite3 useradd userdel getent stat; do
  command -v "$cmd" >/dev/null || fail "\`$cmd\` is not installed (systemd-sysusers: package systemd; sqlite3: package sqlite3; setpriv: util-linux; useradd: passwd)"
done

# What the unit declares; the test follows it rather than repeating it.
unit_value() {
  local v
  v=$(sed -n "s/^$1=[[:space:]]*//p" "$unit" | tail -n 1)
  [ -n "$v" ] || fail "$unit has no $1= line"
  echo "$v"
}
svc_user=$(unit_value User)
svc_group=$(unit_value Group)
dir_mode=$(unit_value StateDirectoryMode)
svc_umask=$(unit_value UMask)
[[ $dir_mode =~ ^[0-7]{3,4}$ ]] || fail "StateDirectoryMode=$dir_mode is not an octal mode"
[[ $svc_umask =~ ^[0-7]{3,4}$ ]] || fail "UMask=$svc_umask is not an octal mode"

# The README's backend contract: the fenced ```sql block after each bold heading, verbatim.
readme_sql() {
  awk -v head="$1" '
    index($0, head) == 1 { found = 1; next }
    found && $0 == "```sql" { inblock = 1; next }
    inblock && $0 == "```" { exit }
    inblock { print }
  ' README.md
}
upsert_sql=$(readme_sql "**Add or replace a user's key**")
read_sql=$(readme_sql "**Read a user's fresh key**")
[[ $upsert_sql == *"INSERT INTO store_keys"*"?3"* ]] \
  || fail "could not find the upsert statement in README.md (\"**Add or replace a user's key**\" then a \`\`\`sql block)"
[[ $read_sql == *"SELECT key FROM store_keys"*"?2"* ]] \
  || fail "could not find the read statement in README.md (\"**Read a user's fresh key**\" then a \`\`\`sql block)"

echo "-- system user and group: systemd-sysusers $sysusers"
systemd-sysusers "$repo/$sysusers"
getent passwd "$svc_user" >/dev/null || fail "$sysusers did not create user $svc_user (the unit's User=)"
getent group "$svc_group" >/dev/null || fail "$sysusers did not create group $svc_group (the unit's Group=)"
[ "$(id -gn "$svc_user")" = "$svc_group" ] \
  || fail "user $svc_user's primary group is $(id -gn "$svc_user"), not $svc_group"

tmp=""
holder_pid=""
created_backend=""
cleanup() {
  local rc=$?
  if [ -n "$holder_pid" ]; then
    touch "$tmp/release" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$holder_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$holder_pid" 2>/dev/null || true
    wait "$holder_pid" 2>/dev/null || true
  fi
  if [ -n "$created_backend" ]; then
    userdel "$backend" 2>/dev/null || true
    if getent group "$backend" >/dev/null; then groupdel "$backend" 2>/dev/null || true; fi
  fi
  [ -n "$tmp" ] && rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT

marker="storekeyd check-backend-access test user"
if getent passwd "$backend" >/dev/null; then
  [ "$(getent passwd "$backend" | cut -d: -f5)" = "$marker" ] \
    || fail "a user named $backend exists and is not this script's; remove it or rename \$backend"
  userdel "$backend"   # a leftover of an interrupted run
  if getent group "$backend" >/dev/null; then groupdel "$backend"; fi
fi
echo "-- backend user: $backend, in group $svc_group as a supplementary group"
useradd --system --user-group --groups "$svc_group" --no-create-home --home-dir /nonexistent \
  --shell /usr/sbin/nologin --comment "$marker" "$backend"
created_backend=1

# /tmp itself, not $TMPDIR: every directory above the state directory must be traversable by the
# two users. The binary is copied there too, so its own path needs no such care.
tmp=$(mktemp -d /tmp/storekeyd-access.XXXXXX)
chmod 0755 "$tmp"
mkdir "$tmp/bin" "$tmp/sql"
cp "$bin_arg" "$tmp/bin/storekeyd"
chmod 0755 "$tmp/bin/storekeyd"
state=$tmp/state
mkdir "$state"
chown "$svc_user:$svc_group" "$state"
chmod "$dir_mode" "$state"
db=$state/storekeyd.db

run_env=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME="$tmp"
  LANG=C.UTF-8 STOREKEYD_DATABASE_URL="sqlite://$db" STOREKEYD_STATE_DIRECTORY="$state")
# as_storekeyd ARGS...: the binary with ARGS, as the unit's user and group, under its umask.
as_storekeyd() {
  # shellcheck disable=SC2016 # expanded by that sh
  setpriv --reuid="$svc_user" --regid="$svc_group" --init-groups -- "${run_env[@]}" \
    sh -c 'umask "$1"; cd "$2"; shift 2; exec "$@"' sh "$svc_umask" "$state" "$tmp/bin/storekeyd" "$@"
}
# as_backend SCRIPT: the sqlite3 CLI on the database, as the backend, reading SCRIPT.
as_backend() {
  # shellcheck disable=SC2016 # expanded by that sh
  setpriv --reuid="$backend" --regid="$backend" --init-groups -- "${run_env[@]}" \
    sh -c 'umask "$1"; exec sqlite3 -batch -bail -init /dev/null "$2"' sh "$backend_umask" "$db" < "$1"
}
# The statements take ?1 user_ref, ?2 kind, ?3 key; the values contain no quotes.
bind() { printf '.parameter set ?%s "'"'"'%s'"'"'"\n' 1 "$1" 2 "$2" 3 "$3"; }
modes() { stat -c '%a %U:%G %n' "$@"; }

echo "-- as $svc_user (umask $svc_umask), directory $dir_mode $svc_user:$svc_group: storekeyd migrate"
as_storekeyd migrate || fail "\`storekeyd migrate\` as $svc_user failed"
modes "$state" "$db"*

echo "-- as $backend (umask $backend_umask): the README's upsert, then its read"
backend_key="backend-written-key-$RANDOM$RANDOM"
{
  echo ".timeout 5000"
  bind backend-user-1 collections "$backend_key"
  echo "$upsert_sql"
  bind backend-user-1 collections ""
  echo "$read_sql"
} > "$tmp/sql/backend-write.sql"
got=$(as_backend "$tmp/sql/backend-write.sql") \
  || fail "the backend could not open, write or read the database (sqlite3's error above)"
[ "$got" = "$backend_key" ] || fail "the backend's read returned '$got', not the key it wrote"
echo "backend wrote and read back its key"

echo "-- as $backend: hold a connection open, so the -wal and -shm files are the backend's"
cat > "$tmp/sql/wait-release.sh" <<EOF
i=0
while [ ! -e "$tmp/release" ] && [ \$i -lt 1200 ]; do sleep 0.1; i=\$((i + 1)); done
EOF
{
  echo ".timeout 5000"
  echo "SELECT count(*) FROM store_keys;"
  echo ".shell sh $tmp/sql/wait-release.sh"
} > "$tmp/sql/hold.sql"
as_backend "$tmp/sql/hold.sql" > "$tmp/hold.out" 2>&1 &
holder_pid=$!
for _ in $(seq 100); do
  [ "$(stat -c %U "$db-shm" 2>/dev/null)" = "$backend" ] && break
  kill -0 "$holder_pid" 2>/dev/null || fail "the backend's connection ended early: $(cat "$tmp/hold.out")"
  sleep 0.1
done
if [ "$(stat -c %U "$db-wal" 2>/dev/null)" != "$backend" ] || [ "$(stat -c %U "$db-shm" 2>/dev/null)" != "$backend" ]; then
  fail "expected the backend to have created $db-wal and -shm; found: $(modes "$db"* | tr '\n' ';')"
fi
modes "$db"*

echo "-- as $svc_user: storekeyd add (a write through the backend's -wal and -shm)"
now=$(date +%s)
b64url() { printf '%s' "$1" | base64 -w0 | tr '+/' '-_' | tr -d '='; }
# A Store-key-shaped JWT (unsigned; `add` only decodes it, nothing is sent anywhere).
daemon_key="$(b64url '{"alg":"RS256","typ":"JWT"}').$(b64url "{\"aud\":\"https://collections.mp.microsoft.com/v6.0/keys\",\"iat\":$now,\"exp\":$((now + 30 * 86400)),\"http://schemas.microsoft.com/marketplace/2015/08/claims/key/clientId\":\"11111111-1111-1111-1111-111111111111\"}").c2lnbmF0dXJl"
printf '%s\n' "$daemon_key" | as_storekeyd add daemon-user-2 \
  || fail "\`storekeyd add\` as $svc_user failed after the backend created the -wal and -shm files"

echo "-- as $backend: read the row storekeyd wrote"
{ echo ".timeout 5000"; bind daemon-user-2 collections ""; echo "$read_sql"; } > "$tmp/sql/backend-read.sql"
got=$(as_backend "$tmp/sql/backend-read.sql") || fail "the backend could not open or read the database (sqlite3's error above)"
[ "$got" = "$daemon_key" ] || fail "the backend's read of storekeyd's row returned '$got', not the key storekeyd stored"
echo "backend read storekeyd's row"

echo "-- modes"
listing=$(modes "$state" "$db" "$db-wal" "$db-shm")
echo "$listing"
[ "$(stat -c %a "$state")" = "$(printf '%o' "$((8#$dir_mode))")" ] \
  || fail "the directory is $(stat -c %a "$state"), not the unit's StateDirectoryMode=$dir_mode"
for f in "$db" "$db-wal" "$db-shm"; do
  m=$((8#$(stat -c %a "$f")))
  [ "$(stat -c %G "$f")" = "$svc_group" ] || fail "$f is not in group $svc_group: $(modes "$f")"
  (( (m & 8#060) == 8#060 )) || fail "$f is not readable and writable by its group: $(modes "$f")"
done
others=$(find "$state" -perm /o=rwx -exec stat -c '%a %U:%G %n' {} +)
[ -z "$others" ] || fail "granted to others: $(echo "$others" | tr '\n' ';')"

summary=$(cd "$state" && stat -c '%n %a %U:%G' . storekeyd.db storekeyd.db-wal storekeyd.db-shm \
  | sed 's|^\. |directory |' | paste -sd ';' - | sed 's/;/, /g')
touch "$tmp/release"
wait "$holder_pid" || fail "the backend's held connection ended with an error: $(cat "$tmp/hold.out")"
holder_pid=""

echo "check-backend-access: OK: backend $backend (group $svc_group) and $svc_user (umask $svc_umask) both wrote and read the database; $summary; nothing for others"
