"""Zero-shot study: train heads on one dataset and measure them in-domain, on "unseen" and on other datasets.

Each `--variant "NAME;field=value;field=value"` is one training run (config file + `--set` overrides common to
all variants, then the variant's own overrides) in `WORKROOT/NAME`. After training, every ensemble member and
the run's combined head (greedy selection on dev, or whatever `ensemble.combine` says) and the plain mean of
all members (row "mean", not a selected head: for comparison) are evaluated on:

* the in-domain test split (`--test-split`, nDCG@10) and its "unseen" view (relevant documents never relevant
  in training, exactly as `esep-jax eval` reports it);
* every `--target NAME=DATA_DIR[:SPLIT]` (zero-shot: same encoder, another corpus).

It prints one table per variant (base values on the first row; deltas in nDCG@10 points, i.e. ×100) and writes
everything to `OUT_DIR/NAME.json`. A row passes when in-domain ≥ `--min-in-domain`, unseen delta ≥
−`--max-unseen-drop` and every zero-shot delta ≥ −`--max-zero-shot-drop` points.

    python tools/zero_shot_study.py --data /tmp/nf --config configs/nfcorpus.py \\
        --target msm=/tmp/msm --target demo=/tmp/demo:test \\
        --variant "rw10;loss.recovery_weight=10" --variant "judged;loss.negatives=judged"

`--eval-only` re-evaluates existing workdirs without training; `--summary` prints the saved tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, *overrides = [part.strip() for part in text.split(";") if part.strip()]
    return name, overrides


def parse_target(text: str) -> tuple[str, str, str]:
    name, rest = text.split("=", 1)
    data, _, split = rest.partition(":")
    return name, data, split or "test"


class Target:
    """One split of one dataset with its exact index, queries, base ranking and (optionally) unseen view."""

    def __init__(self, name: str, data: str, split: str, eval_config, with_unseen: bool):
        from esep_jax.data.dataset import Dataset
        from esep_jax.eval.evaluate import SplitEvaluator
        from esep_jax.eval.report import documents_relevant_in
        from esep_jax.eval.retrieval import ExactIndex

        self.name, self.data, self.split = name, data, split
        self.dataset = Dataset(data)
        self.eval_config = eval_config
        self.evaluator = SplitEvaluator(self.dataset, self.dataset.qrels(split),
                                        ExactIndex(self.dataset.read_corpus(), eval_config.corpus_chunk),
                                        top_k=eval_config.top_k, query_chunk=eval_config.query_chunk,
                                        relevance_level=eval_config.relevance_level)
        self.seen = (documents_relevant_in(self.dataset, "train", eval_config.relevance_level)
                     if with_unseen and split != "train" else None)
        self.base = self.measure(self.evaluator.queries)

    def measure(self, vectors: np.ndarray) -> dict:
        from esep_jax.eval.metrics import mean_metrics, per_query_metrics
        from esep_jax.eval.report import unseen_relevant_view

        ranking = self.evaluator.rank_vectors(np.asarray(vectors, np.float32))
        out = {"ndcg@10": ranking.metrics["ndcg@10"], "recall@100": ranking.metrics["recall@100"]}
        if self.seen is not None:
            rows, scores, view, keep = unseen_relevant_view(ranking, self.evaluator.qrels, self.seen,
                                                            self.eval_config.relevance_level)
            if len(keep):
                ev = self.evaluator
                metrics = mean_metrics(per_query_metrics(rows, scores, view, ev.doc_id_rank, ev.cutoffs,
                                                         self.eval_config.relevance_level))
                out["unseen_ndcg@10"], out["unseen_queries"] = metrics["ndcg@10"], len(keep)
        return out


def evaluate_run(workdir: Path, data: str, targets: list[Target], in_domain: Target) -> dict:
    import jax

    from esep_jax.config import member_values
    from esep_jax.data.dataset import Dataset
    from esep_jax.ensemble import combine
    from esep_jax.train.loop import load_best_head
    from esep_jax.train.step import apply_members

    config, head, params, weights, best_steps = load_best_head(workdir, Dataset(data))
    vectors_of = jax.jit(lambda p, q: apply_members(head, p, q))
    systems = [f"m{i}" for i in range(len(weights))] + ["ensemble"] + (["mean"] if len(weights) > 1 else [])
    results = {system: {} for system in systems}
    for target in [in_domain, *targets]:
        members = np.asarray(vectors_of(params, target.evaluator.queries))
        vectors = list(members) + [combine(members, weights.astype(np.float32))]
        if len(weights) > 1:  # the plain mean of all members (ensemble.combine=mean), for comparison
            vectors.append(members.mean(axis=0))
        for system, v in zip(systems, vectors):
            results[system][target.name] = target.measure(v)
    # How far each member moved from the identity: ‖W − I‖_F of the effective linear map, where computable.
    summary = json.loads((workdir / "summary.json").read_text()) if (workdir / "summary.json").exists() else {}
    return {"workdir": str(workdir), "config": json.loads((workdir / "config.json").read_text()),
            "member_values": member_values(config), "weights": weights.tolist(),
            "best_steps": np.asarray(best_steps).tolist(), "member_dev": summary.get("member_dev"),
            "ensemble_dev": (summary.get("best_dev") or {}).get("ndcg@10"), "results": results}


def table(record: dict, base: dict, in_domain: str, target_names: list[str], limits: argparse.Namespace) -> str:
    """Rows: base, then each member and the ensemble. Deltas are in nDCG@10 points (×100)."""
    values = record.get("member_values", {})
    head = (f"{'system':<9}{'lr':>7}{'wd':>7}{'T':>6}{'rw':>6}{'w':>5}{'step':>6}{'dev':>8}{'in-dom':>8}"
            f"{'unseen':>8}" + "".join(f"{'Δ' + n:>9}" for n in target_names) + "  ok")
    b = base[in_domain]
    lines = [head, f"{'base':<9}{'':>58}{b['ndcg@10']:>8.4f}{b.get('unseen_ndcg@10', float('nan')):>8.4f}"
             + "".join(f"{base[n]['ndcg@10']:>9.4f}" for n in target_names)]
    members = len(record["weights"])
    for i, (system, res) in enumerate(record["results"].items()):
        r = res[in_domain]
        unseen = 100 * (r.get("unseen_ndcg@10", np.nan) - b.get("unseen_ndcg@10", np.nan))
        deltas = [100 * (res[n]["ndcg@10"] - base[n]["ndcg@10"]) for n in target_names]
        ok = (r["ndcg@10"] >= limits.min_in_domain and not unseen < -limits.max_unseen_drop
              and all(d >= -limits.max_zero_shot_drop for d in deltas))
        if system in ("ensemble", "mean"):
            hp = f"{'':>31}{'':>6}"
            dev = record.get("ensemble_dev") if system == "ensemble" else None
        else:
            hp = (f"{values['learning_rate'][i]:>7.0e}{values['weight_decay'][i]:>7.0e}"
                  f"{values['temperature'][i]:>6.3g}{values['recovery_weight'][i]:>6.3g}"
                  f"{record['weights'][i]:>5.2f}{record['best_steps'][i]:>6d}")
            dev = (record.get("member_dev") or [{}] * members)[i].get("ndcg@10")
        dev_text = f"{dev:>8.4f}" if dev is not None else f"{'':>8}"
        lines.append(f"{system:<9}{hp}{dev_text}{r['ndcg@10']:>8.4f}{unseen:>+8.2f}"
                     + "".join(f"{d:>+9.2f}" for d in deltas) + ("  ok" if ok else "  --"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="training dataset directory")
    parser.add_argument("--config", help="config file (configs/*.py); defaults if omitted")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override for every variant (e.g. train.num_steps=600)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME;F=V;...",
                        help="one run: its name and its own overrides, ';'-separated")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=DIR[:SPLIT]",
                        help="zero-shot target dataset (split defaults to test)")
    parser.add_argument("--test-split", default="test", help="in-domain evaluation split")
    parser.add_argument("--workroot", default="/tmp/zs/runs", help="workdirs go to WORKROOT/NAME")
    parser.add_argument("--out-dir", default="/tmp/zs", help="JSON results go to OUT_DIR/NAME.json")
    parser.add_argument("--eval-only", action="store_true", help="evaluate existing workdirs, do not train")
    parser.add_argument("--summary", action="store_true", help="print the tables saved for these variants")
    parser.add_argument("--min-in-domain", type=float, default=0.0, help="in-domain nDCG@10 bar for 'ok'")
    parser.add_argument("--max-unseen-drop", type=float, default=0.5, help="points")
    parser.add_argument("--max-zero-shot-drop", type=float, default=1.0, help="points")
    args = parser.parse_args(argv)

    variants = [parse_variant(v) for v in args.variant]
    target_specs = [parse_target(t) for t in args.target]
    target_names = [name for name, _, _ in target_specs]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.summary:
        for name, _ in variants:
            record = json.loads((out_dir / f"{name}.json").read_text())
            print(f"\n== {name}: {' '.join(record['overrides'])}")
            print(table(record, record["base"], "in_domain", record["targets"], args))
        return 0

    from esep_jax.config import EvalConfig, load_config
    from esep_jax.train.loop import train_and_evaluate

    eval_config = EvalConfig()
    in_domain = Target("in_domain", args.data, args.test_split, eval_config, with_unseen=True)
    targets = [Target(name, data, split, eval_config, with_unseen=False) for name, data, split in target_specs]
    base = {t.name: t.base for t in [in_domain, *targets]}
    for name, overrides in variants:
        all_overrides = [*args.set, *overrides]
        workdir = Path(args.workroot) / name
        started = time.time()
        if not args.eval_only:
            config = load_config(args.config, all_overrides)
            train_and_evaluate(config, args.data, workdir, progress=False)
        trained = time.time() - started
        record = evaluate_run(workdir, args.data, targets, in_domain)
        record.update(name=name, data=args.data, config_file=args.config, overrides=all_overrides, base=base,
                      targets=target_names, train_seconds=round(trained, 1),
                      target_specs=[list(spec) for spec in target_specs])
        (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"\n== {name} ({trained:.0f}s): {' '.join(all_overrides)}")
        print(table(record, base, "in_domain", target_names, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
