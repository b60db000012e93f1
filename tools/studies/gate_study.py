"""Gate study: how the in-domain gate's band trades in-domain gain against zero-shot loss, without retraining.

The gate (`esep_jax/heads/gate.py`) is calibrated after training from the run's anchors, so one trained run can
be re-gated with any `--quantile` × `--width`: for each setting and each `--target NAME=DATASET:SPLIT`, the
table gives the head's nDCG@10 minus the base's, in points, and the mean share of the head its queries get
(the new-documents view is added for a dataset made by `esep-jax new-documents`). The first target is usually
the run's own dataset (in-domain), the others zero-shot. Choose on dev splits; the default
(`model.gate_quantile=0.05`, `gate_width=0.1`) came from

    python tools/studies/gate_study.py --run /tmp/gen/defaults/s1/nf \\
        --target nf=/tmp/nfcorpus:dev --target pystdlib=/tmp/demo:dev
    python tools/studies/gate_study.py --run /tmp/gen/defaults/s1/pystdlib \\
        --target pystdlib=/tmp/demo:dev --target nf=/tmp/nfcorpus:dev

(runs of `tools/studies/generalisation_study.py`). Only reads the run and the datasets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def parse_target(text: str) -> tuple[str, str, str]:
    name, sep, rest = text.partition("=")
    path, colon, split = rest.rpartition(":")
    if not sep or not colon or not name or not path or not split:
        raise SystemExit(f"expected NAME=DATASET:SPLIT, got {text!r}")
    return name, path, split


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished training workdir whose config has a knn gate")
    parser.add_argument("--target", action="append", required=True, type=parse_target,
                        metavar="NAME=DATASET:SPLIT", help="a dataset and split to evaluate on; repeat")
    parser.add_argument("--quantile", default="0.01,0.05,0.1,0.2", help="gate quantiles, comma-separated")
    parser.add_argument("--width", default="0.05,0.1,0.15", help="gate widths, comma-separated")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    args = parser.parse_args(argv)

    from esep_jax.data.dataset import Dataset
    from esep_jax.evaluation.evaluator import SplitEvaluator
    from esep_jax.evaluation.retrieval import ExactIndex
    from esep_jax.evaluation.views import unseen_metrics
    from esep_jax.heads.gate import blend, similarity
    from esep_jax.runs.trained_run import TrainedRun

    run = TrainedRun.load(args.run)
    if run.gate is None:
        raise SystemExit(f"{args.run}: the run has no in-domain gate (model.gate=none, or not finished)")
    anchors, neighbours = run.gate.anchors, run.gate.neighbours
    own = similarity(anchors, anchors, neighbours, exclude_self=True)

    def score(name: str, evaluator: SplitEvaluator, vectors: np.ndarray) -> dict[str, float]:
        ranking = evaluator.rank_vectors(vectors)
        out = {name: ranking.metrics["ndcg@10"]}
        dataset = evaluator.dataset
        if dataset.new_documents is not None:
            old = np.ones(dataset.num_documents, bool)
            old[dataset.new_documents] = False
            _, view = unseen_metrics(ranking, evaluator.qrels, old, 1, evaluator.doc_id_rank, evaluator.cutoffs)
            if view is not None:
                out[f"{name} (new documents)"] = view["ndcg@10"]
        return out

    targets, base = [], {}
    for name, path, split in args.target:
        dataset = Dataset(path)
        evaluator = SplitEvaluator(dataset, dataset.qrels(split), ExactIndex(dataset.read_corpus()), top_k=100)
        queries = evaluator.base_vectors()
        targets.append((name, evaluator, queries, np.asarray(run.head_transform(queries)),
                        similarity(anchors, queries, neighbours)))
        base.update(score(name, evaluator, queries))

    rows = []
    for quantile in [float(v) for v in args.quantile.split(",")]:
        for width in [float(v) for v in args.width.split(",")]:
            upper = float(np.quantile(own, quantile))
            row = {"quantile": quantile, "width": width, "delta_points": {}, "gate_mean": {}}
            for name, evaluator, queries, head, s in targets:
                weights = np.clip((s - (upper - width)) / width, 0.0, 1.0)
                row["gate_mean"][name] = float(weights.mean())
                for key, value in score(name, evaluator, blend(queries, head, weights)).items():
                    row["delta_points"][key] = 100 * (value - base[key])
            rows.append(row)

    columns = list(base)
    print(f"run {args.run}; base nDCG@10: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()))
    print("| quantile | width | " + " | ".join(f"{c}: Δ points (gate)" for c in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row['delta_points'][c]:+.2f} ({row['gate_mean'][c.split(' (')[0]]:.2f})" for c in columns]
        print(f"| {row['quantile']:g} | {row['width']:g} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "base": base, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from esep_jax.errors import InputError

    try:
        sys.exit(main())
    except InputError as error:  # one line naming the file, as the CLI reports it
        print(f"gate_study: error: {error}", file=sys.stderr)
        sys.exit(2)
