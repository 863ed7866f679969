#!/usr/bin/env bash
# install.sh - install, upgrade or remove aitbc-miner on Debian (12+), as root.
#
#   scripts/install.sh [--prefix DIR] [--config FILE] [--wheel FILE] [--find-links DIR]
#   scripts/install.sh --uninstall [--purge]
#
# Install (idempotent; running it again is an upgrade, see README "Upgrade"):
#   - the system user aitbc-miner (sysusers.d) and the directories (tmpfiles.d)
#   - a fresh venv PREFIX/venvs/<stamp> built from this source tree (or --wheel)
#     with the [systemd] extra, then PREFIX/.venv -> venvs/<stamp> switched
#     atomically; the previous venv is kept for a rollback, older ones removed
#   - the shipped Python tasks to PREFIX/tasks
#   - /etc/aitbc/miner/config.yaml (from --config or etc/config.yaml) only when
#     there is none; otherwise the shipped one goes next to it as config.yaml.dist
#   - /etc/aitbc/miner/allowlist.d/*.yaml and /etc/logrotate.d/aitbc-miner:
#     replaced when unedited since the last install, else kept (new one as .dist)
#   - /etc/aitbc/miner/miner.env (0600, MINER_AUTH) as an example, never overwritten
#   - the unit to /usr/local/lib/systemd/system/aitbc-miner.service; daemon-reload
# It never starts, stops or enables the service; it prints the next steps.
#
# Uninstall: stops and disables the unit, removes the unit, PREFIX (venvs,
# tasks), the logrotate, sysusers.d and tmpfiles.d snippets. It keeps
# /etc/aitbc/miner (config, token), /var/lib/aitbc/miner (jobs, node_id),
# /var/log/aitbc/miner, /var/cache/aitbc/miner and the aitbc-miner user that
# owns them. --purge removes those too, and the user and group.
#
# Options:
#   --prefix DIR       program directory (default /usr/local/lib/aitbc/miner)
#   --config FILE      config.yaml to install when /etc/aitbc/miner has none
#   --wheel FILE       install this aitbc-miner wheel instead of the source tree
#   --find-links DIR   offline: pip --no-index --find-links DIR (a wheelhouse)
#   --python PATH      interpreter for the venv (default /usr/bin/python3)
#   --no-apt           never apt-get install missing Debian packages
#   --uninstall        remove (see above); --purge: remove config, state, user too
set -euo pipefail
umask 022

DEFAULT_PREFIX=/usr/local/lib/aitbc/miner
PREFIX=$DEFAULT_PREFIX
CONFIG=""
WHEEL=""
FIND_LINKS=""
PYTHON=/usr/bin/python3
APT=1
MODE=install
PURGE=0

NAME=aitbc-miner
USER_NAME=aitbc-miner
ETC=/etc/aitbc/miner
UNIT_DIR=/usr/local/lib/systemd/system
UNIT=$UNIT_DIR/$NAME.service
SYSUSERS=/usr/local/lib/sysusers.d/$NAME.conf
TMPFILES=/usr/local/lib/tmpfiles.d/$NAME.conf
LOGROTATE=/etc/logrotate.d/$NAME
STATE=/var/lib/aitbc/miner
LOGS=/var/log/aitbc/miner
CACHE=/var/cache/aitbc/miner
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case $1 in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
    --prefix=*) PREFIX=${1#*=} ;;
    --config) CONFIG=${2:?--config needs a file}; shift ;;
    --config=*) CONFIG=${1#*=} ;;
    --wheel) WHEEL=${2:?--wheel needs a file}; shift ;;
    --wheel=*) WHEEL=${1#*=} ;;
    --find-links) FIND_LINKS=${2:?--find-links needs a directory}; shift ;;
    --find-links=*) FIND_LINKS=${1#*=} ;;
    --python) PYTHON=${2:?--python needs a path}; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    --no-apt) APT=0 ;;
    --uninstall) MODE=uninstall ;;
    --purge) PURGE=1 ;;
    -h|--help) usage 0 ;;
    *) printf 'install.sh: unknown option %s\n' "$1" >&2; usage 2 ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || die "run as root (it creates a system user and installs a unit)"
case $PREFIX in /*) ;; *) die "--prefix must be absolute" ;; esac
PREFIX=${PREFIX%/}
[ "$PURGE" = 0 ] || [ "$MODE" = uninstall ] || die "--purge goes with --uninstall"

systemd_running() { [ -d /run/systemd/system ]; }

# --- uninstall ---------------------------------------------------------------------------

uninstall() {
  if systemd_running; then
    if systemctl is-active --quiet "$NAME" 2>/dev/null; then
      say "stopping $NAME (running jobs get shutdown.grace_s to finish)"
    fi
    systemctl disable --now "$NAME" >/dev/null 2>&1 || true
  fi
  rm -f "$UNIT" "$LOGROTATE" "$SYSUSERS" "$TMPFILES"
  rm -rf "$PREFIX"
  rmdir --ignore-fail-on-non-empty "$(dirname "$PREFIX")" 2>/dev/null || true
  if [ "$PURGE" = 1 ]; then
    rm -rf "$ETC" "$STATE" "$LOGS" "$CACHE" "/etc/systemd/system/$NAME.service.d"
    for d in /etc/aitbc /var/lib/aitbc /var/log/aitbc /var/cache/aitbc; do
      rmdir --ignore-fail-on-non-empty "$d" 2>/dev/null || true
    done
    if getent passwd "$USER_NAME" >/dev/null; then userdel "$USER_NAME"; fi
    if getent group "$USER_NAME" >/dev/null; then groupdel "$USER_NAME"; fi
  fi
  if systemd_running; then
    systemctl daemon-reload
    systemctl reset-failed "$NAME" >/dev/null 2>&1 || true
  fi
  if [ "$PURGE" = 1 ]; then
    say "removed $NAME, its configuration, state, logs, cache and the $USER_NAME user"
  else
    say "removed $NAME; kept $ETC, $STATE, $LOGS, $CACHE and the $USER_NAME user"
    say "(scripts/install.sh --uninstall --purge removes those too)"
  fi
}

# --- install helpers ---------------------------------------------------------------------

ensure_debs() {  # ensure_debs PKG... : apt-get install what is missing (unless --no-apt)
  local missing=() p
  command -v dpkg >/dev/null || return 0
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$APT" = 1 ] || die "missing Debian packages: ${missing[*]} (apt-get install them, or drop --no-apt)"
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# install_conffile SRC DEST MODE GROUP: a shipped configuration file. Replaced when
# absent or unedited since we last installed it (its sha256 is in PREFIX/conffiles);
# an edited one is kept and the new version lands next to it as DEST.dist.
install_conffile() {
  local src=$1 dest=$2 mode=$3 group=$4 db=$PREFIX/conffiles new old cur
  new=$(sha256sum "$src" | cut -d' ' -f1)
  old=$(awk -v f="$dest" '$2 == f { print $1 }' "$db" 2>/dev/null || true)
  if [ -e "$dest" ]; then
    cur=$(sha256sum "$dest" | cut -d' ' -f1)
    if [ "$cur" != "$new" ] && [ "$cur" != "$old" ]; then
      install -m "$mode" -o root -g "$group" "$src" "$dest.dist"
      say "kept edited $dest (the shipped version is $dest.dist)"
      new=$old
    else
      install -m "$mode" -o root -g "$group" "$src" "$dest"
      rm -f "$dest.dist"
    fi
  else
    install -m "$mode" -o root -g "$group" "$src" "$dest"
  fi
  if [ -n "$new" ]; then
    { grep -v -F "  $dest" "$db" 2>/dev/null || true; printf '%s  %s\n' "$new" "$dest"; } > "$db.tmp"
    mv -f "$db.tmp" "$db"
  fi
}

with_prefix() {  # rewrite the default program directory in a shipped file
  if [ "$PREFIX" = "$DEFAULT_PREFIX" ]; then cat "$1"; else sed "s#$DEFAULT_PREFIX#$PREFIX#g" "$1"; fi
}

create_user_and_dirs() {
  install -d -m 0755 "$(dirname "$SYSUSERS")" "$(dirname "$TMPFILES")"
  install -m 0644 "$SRC/systemd/$NAME.sysusers.conf" "$SYSUSERS"
  install -m 0644 "$SRC/systemd/$NAME.tmpfiles.conf" "$TMPFILES"
  if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$SYSUSERS"
  elif ! getent passwd "$USER_NAME" >/dev/null; then
    useradd --system --user-group --home-dir "$STATE" --no-create-home \
      --shell /usr/sbin/nologin --comment "AITBC compute miner" "$USER_NAME"
  fi
  getent passwd "$USER_NAME" >/dev/null || die "could not create the $USER_NAME user"
  if command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --create "$TMPFILES"
  else
    awk '$1 == "d" { print $2, $3, $4, $5 }' "$TMPFILES" | while read -r path mode owner group; do
      install -d -m "$mode" -o "$owner" -g "$group" "$path"
    done
  fi
}

build_venv() {
  local stamp venv tmp pip_args=() target
  stamp=$(date -u +%Y%m%dT%H%M%SZ)-$$
  venv=$PREFIX/venvs/$stamp
  install -d -m 0755 "$PREFIX" "$PREFIX/venvs"
  say "building the venv $venv"
  "$PYTHON" -m venv "$venv" || die "'$PYTHON -m venv' failed (Debian: apt-get install python3-venv)"
  if [ -n "$FIND_LINKS" ]; then pip_args+=(--no-index --find-links "$FIND_LINKS"); fi
  tmp=$(mktemp -d)
  if [ -n "$WHEEL" ]; then
    [ -f "$WHEEL" ] || die "--wheel $WHEEL: no such file"
    target="$WHEEL[systemd]"
  else
    # Build from a copy: the source tree may be read-only (a bind mount, a CI checkout).
    cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/aitbc_miner" "$SRC/mock_coordinator" "$tmp/"
    find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
    target="$tmp[systemd]"
  fi
  if ! PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
      "$venv/bin/python" -m pip install -q "${pip_args[@]}" "$target"; then
    rm -rf "$venv" "$tmp"
    die "pip install failed (the previous venv, if any, is still in use)"
  fi
  rm -rf "$tmp"
  "$venv/bin/python" -m aitbc_miner version >/dev/null || { rm -rf "$venv"; die "the new venv does not run"; }
  # Switch atomically: a rename of a symlink over the old one.
  ln -sfn "venvs/$stamp" "$PREFIX/.venv.new"
  if [ -d "$PREFIX/.venv" ] && [ ! -L "$PREFIX/.venv" ]; then rm -rf "$PREFIX/.venv"; fi
  mv -Tf "$PREFIX/.venv.new" "$PREFIX/.venv"
  # Keep the new venv and the one before it (rollback; a running daemon still uses it).
  ls -1 "$PREFIX/venvs" | sort | head -n -2 | while read -r old; do rm -rf "${PREFIX:?}/venvs/$old"; done
  say "venv ready: $PREFIX/.venv -> venvs/$stamp ($("$PREFIX/.venv/bin/python" -m aitbc_miner version))"
}

install_tasks() {
  local pkg
  pkg=$("$PREFIX/.venv/bin/python" -c 'import aitbc_miner.tasks as t, os; print(os.path.dirname(t.__file__))')
  install -d -m 0755 "$PREFIX/tasks"
  install -m 0644 "$SRC/README.md" "$PREFIX/README.md"  # the unit's Documentation=
  find "$pkg" -maxdepth 1 -name '*.py' ! -name '__init__.py' -exec install -m 0644 {} "$PREFIX/tasks/" \;
}

install_config() {
  local shipped=${CONFIG:-$SRC/etc/config.yaml} f
  [ -f "$shipped" ] || die "--config $shipped: no such file"
  install -d -m 0750 -o root -g "$USER_NAME" "$ETC" "$ETC/allowlist.d"
  if [ -e "$ETC/config.yaml" ]; then
    with_prefix "$shipped" > "$ETC/config.yaml.dist.tmp"
    if cmp -s "$ETC/config.yaml.dist.tmp" "$ETC/config.yaml"; then
      rm -f "$ETC/config.yaml.dist.tmp" "$ETC/config.yaml.dist"
    else
      install -m 0640 -o root -g "$USER_NAME" "$ETC/config.yaml.dist.tmp" "$ETC/config.yaml.dist"
      rm -f "$ETC/config.yaml.dist.tmp"
      say "kept $ETC/config.yaml (compare with $ETC/config.yaml.dist)"
    fi
  else
    with_prefix "$shipped" > "$ETC/config.yaml.tmp"
    install -m 0640 -o root -g "$USER_NAME" "$ETC/config.yaml.tmp" "$ETC/config.yaml"
    rm -f "$ETC/config.yaml.tmp"
  fi
  for f in "$SRC"/allowlist.d/*.yaml; do
    install_conffile "$f" "$ETC/allowlist.d/$(basename "$f")" 0640 "$USER_NAME"
  done
  if [ ! -e "$ETC/miner.env" ]; then
    ( umask 077; cat > "$ETC/miner.env" <<'EOF'
# Environment of aitbc-miner.service (EnvironmentFile=). Mode 0600, root only:
# systemd reads it before dropping privileges; the daemon never logs it.
#
# The coordinator's bootstrap token (config: coordinator.auth_token = env:MINER_AUTH).
#MINER_AUTH=
#
# Any config key can be overridden here as AITBC_MINER_<SECTION>__<KEY>, e.g.
# (single quotes keep JSON's double quotes intact)
#AITBC_MINER_SECURITY__MANIFEST_KEYS='{"k1": "<base64 raw ed25519 public key>"}'
EOF
    )
    chown root:root "$ETC/miner.env"
    chmod 0600 "$ETC/miner.env"
  fi
}

install_unit() {
  install -d -m 0755 "$UNIT_DIR" /etc/logrotate.d
  with_prefix "$SRC/systemd/$NAME.service" > "$UNIT.tmp"
  install -m 0644 "$UNIT.tmp" "$UNIT"
  rm -f "$UNIT.tmp"
  install_conffile "$SRC/etc/logrotate.d/$NAME" "$LOGROTATE" 0644 root
  if systemd_running; then systemctl daemon-reload; fi
}

next_steps() {
  cat <<EOF

aitbc-miner is installed ($PREFIX). Next steps:
  1. put the coordinator's bootstrap token in $ETC/miner.env:   MINER_AUTH=...
  2. edit $ETC/config.yaml: coordinator.base_url, security.manifest_keys, slots
  3. check it:   (set -a; . $ETC/miner.env; runuser -u $USER_NAME -- \\
                   $PREFIX/.venv/bin/python -m aitbc_miner check-config --config $ETC/config.yaml)
  4. start it:   systemctl enable --now $NAME
  5. watch it:   systemctl status $NAME; journalctl -u $NAME -f
                 curl -s http://127.0.0.1:9464/readyz; curl -s http://127.0.0.1:9464/metrics
EOF
  if systemctl is-active --quiet "$NAME" 2>/dev/null; then
    echo "  The service is running the previous version: systemctl restart $NAME (it drains first)."
  fi
}

install_all() {
  ensure_debs python3-venv
  # systemd-python is built from source unless the wheelhouse has a wheel of it.
  [ -n "$FIND_LINKS" ] || ensure_debs python3-dev gcc pkg-config libsystemd-dev
  create_user_and_dirs
  build_venv
  install_tasks
  install_config
  install_unit
  next_steps
}

case $MODE in
  install) install_all ;;
  uninstall) uninstall ;;
esac
