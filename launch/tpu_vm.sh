#!/usr/bin/env bash
# Every worker of a Cloud TPU VM slice runs the same command; JAX detects the slice (--distributed auto).
#   launch/tpu_vm.sh TPU_NAME ZONE --data gs://bucket/dataset --workdir gs://bucket/runs/x [--config F]
# Needs gcloud, a bucket both for the data and the workdir (tensorstore reads gs:// datasets directly; orbax
# writes gs:// checkpoints), and the project checked out at the same path on every worker.
set -euo pipefail
tpu="$1" zone="$2"
shift 2
args="$(printf ' %q' "$@")"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/esep_jax && (test -x .venv/bin/esep-jax || (python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]')) \
   && .venv/bin/esep-jax train --distributed auto$args"
