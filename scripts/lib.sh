# Shared by the scripts: timing of phases and root checks. Sourced, not run.

efci_here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# phase NAME COMMAND...: run a command, printing its name and how long it took.
phase() {
  local name=$1 start rc ms
  shift
  start=$(date +%s%N)
  printf '\n==> %s\n' "$name"
  rc=0
  "$@" || rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '<== %s: %d.%ds%s\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) \
    "$([ $rc = 0 ] || echo " (FAILED, exit status $rc)")"
  return $rc
}

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "$(basename "$0"): run this as root (it installs packages and starts dockerd)" >&2
    exit 1
  fi
}
