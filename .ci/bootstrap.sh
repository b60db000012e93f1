#!/usr/bin/env bash
# Source me: creates ./.venv on first use and (re)installs the project when pyproject.toml changes.
# Extras to install: ESEP_EXTRAS (default "dev"); ESEP_TORCH pins a torch build to install first (for the
# encoder extra, e.g. "torch==2.13.0"), since an unpinned torch may resolve to a multi-GB CUDA build.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
extras="${ESEP_EXTRAS:-dev}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "esep-jax: creating $venv" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
stamp="$venv/.esep-installed"
want="$(sha256sum < "$repo/pyproject.toml" | cut -c1-16) $extras ${ESEP_TORCH:-}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "esep-jax: installing esep-jax[$extras] into $venv (first run takes a minute or two)" >&2
  if [ -n "${ESEP_TORCH:-}" ]; then "$venv/bin/python" -m pip install -q "$ESEP_TORCH"; fi
  "$venv/bin/python" -m pip install -q -e "$repo[$extras]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
