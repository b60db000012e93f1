#!/usr/bin/env bash
# N processes on this machine, each with D CPU devices, joined by JAX's distributed runtime (gloo collectives):
#   launch/multiprocess_cpu.sh N D --data DIR --workdir W [--config F] [--config.x=y ...]
# The same program as on N hosts, for trying multi-host runs (and for the tests). Exits non-zero if any fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/bootstrap.sh
processes="$1" devices="$2"
shift 2
port="${ESEP_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"
pids=()
for ((i = 0; i < processes; i++)); do
  JAX_NUM_CPU_DEVICES="$devices" JAX_PLATFORMS=cpu esep-jax train "$@" --coordinator "localhost:$port" \
    --num-processes "$processes" --process-id "$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
