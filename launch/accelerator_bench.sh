#!/usr/bin/env bash
# The MS MARCO-scale train step on one accelerator (H100/H200, or a TPU VM), in a few minutes: 8.8M × 768
# corpus in bfloat16, batch 65,536, the exact full-corpus softmax; prints the step time, utilisation against
# this device's own matmul peak (measured in the same run), pairs/s, peak memory, and one epoch over MS MARCO's
# 502,939 training queries. Extra arguments go to `esep-jax bench train` (e.g. --corpus-size 100000 --batch 1024
# to try it small; --members 1,8 for an ensemble).
#
#   bash launch/accelerator_bench.sh --json bench_h200.json --markdown bench_h200.md
#
# Needs an accelerator build of JAX in the environment (e.g. `pip install "jax[cuda13]"` on NVIDIA); on a
# machine without one it runs on the CPU, which is how tests/test_bench.py tries it at a small size.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${ESEP_NO_BOOTSTRAP:-}" ]; then source .ci/bootstrap.sh; fi
python -c "import jax; print('esep-jax: benchmarking on', jax.devices()[0].device_kind, 'x', jax.device_count(), flush=True)"
exec esep-jax bench train --corpus-size 8800000 --dim 768 --batch 65536 --dtype bfloat16 --steps 3 \
  --no-torch --epoch-queries 502939 "$@"
