#!/usr/bin/env bash
# The main job on the bundled demo data (code search over the Python standard library, all-MiniLM-L6-v2):
# set up .venv on first use, ingest the embeddings, train a head, and evaluate base vs head on test.
# Outputs go to runs/demo/ (or $ESEP_DEMO_DIR); each invocation starts that run afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/bootstrap.sh
demo=esep_jax/demo_data/pystdlib
out="${ESEP_DEMO_DIR:-runs/demo}"
rm -rf "$out/workdir"
esep-jax ingest --corpus "$demo/minilm/corpus.npy" --corpus-ids "$demo/minilm/corpus_ids.txt" \
  --queries "$demo/minilm/queries.npy" --query-ids "$demo/minilm/queries_ids.txt" \
  --qrels "train=$demo/qrels/train.tsv" --qrels "dev=$demo/qrels/dev.tsv" --qrels "test=$demo/qrels/test.tsv" \
  --encoder all-MiniLM-L6-v2 --name pystdlib --out "$out/dataset" --overwrite
esep-jax train --data "$out/dataset" --workdir "$out/workdir" "$@"   # the defaults, as for any dataset
esep-jax eval --data "$out/dataset" --split test --workdir "$out/workdir" --json "$out/test_metrics.json" \
  --run "$out/test.run"
echo "metrics: $out/test_metrics.json; per-step log: $out/workdir/metrics.jsonl; curves: $out/workdir/train_curves.png"
