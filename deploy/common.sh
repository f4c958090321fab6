# Sourced by the deploy/*.sh scripts: locate the venv and insist on the pinned Flower version.
set -euo pipefail
ALIGNFL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALIGNFL_BIN="${ALIGNFL_BIN:-$ALIGNFL_ROOT/.venv/bin}"
export PATH="$ALIGNFL_BIN:$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1

die() { echo "error: $*" >&2; exit 1; }

# Every SuperLink, SuperNode and CLI of a federation must run the Flower pinned in constraints.txt.
check_flower_pin() {
  [ -x "$ALIGNFL_BIN/python" ] || die "no Python at $ALIGNFL_BIN; run scripts/setup or set ALIGNFL_BIN to the venv's bin folder"
  local want have
  want="$(sed -n 's/^flwr==\(.*\)$/\1/p' "$ALIGNFL_ROOT/constraints.txt")"
  have="$("$ALIGNFL_BIN/python" -c 'import importlib.metadata as m; print(m.version("flwr"))' 2>/dev/null || true)"
  [ "$have" = "$want" ] || die "flwr ${have:-missing} installed in $ALIGNFL_BIN, but constraints.txt pins $want; run scripts/setup on this machine"
}
