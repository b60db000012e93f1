#!/usr/bin/env bash
# Train on one machine (all its local devices): launch/local.sh --data DIR --workdir W [--config F] [--config.x=y]
# Rerunning with the same --workdir resumes from the newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/bootstrap.sh
exec esep-jax train "$@"
