"""Skip-guard study: why `esep-jax mine --skip S` helps with sparse labels and not on (dense) NFCorpus.

The skip guard drops the first S unjudged documents of each query's ranking before keeping k hard negatives,
because near-top unjudged documents are often *unlabelled positives*. NFCorpus has dense qrels (~40 judged
positives per training query), so exclusion of judged positives already removes almost all of them and the
guard only throws away useful hard negatives. This study simulates MS MARCO-style sparse labels on NFCorpus:

1. Ingest a *sparse-label* copy of NFCorpus whose train qrels keep ONE positive per query (the highest grade;
   ties broken by a seeded random choice). Dev/test qrels are unchanged.
2. Mine k hard negatives on it for every `--mine-skips` S and count the "hidden positives": mined negatives
   that ARE positives in the original full train qrels (the false-negative rate the guard should reduce).
   The same count on the dense dataset (`--dense-data`, lists `hard_s{S}`, mined there if missing) is zero
   by construction; for it the share of the raw top skip+k that exclusion removed is reported instead.
3. Train sampled-softmax heads on the sparse dataset with hard negatives from each `--train-skips` S and
   without hard negatives ("none"), for each seed, and evaluate dev and test nDCG@10.

Prints a markdown table and writes everything to `OUT/summary.json`. Finished steps (the dataset, candidate
lists, evaluated runs) are reused, so a rerun only does what is missing.

    python tools/studies/skip_guard_study.py --source /work/shared/data/nfcorpus --dense-data /tmp/nf --out /tmp/skip \\
        --mine-skips 0,3,10,30 --train-skips 0,10,30 --seeds 0 --extra-seed-skips 0,10 --extra-seeds 1
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def cli(*args: str, log: Path | None = None) -> None:
    """Run `esep-jax ARGS` with this interpreter; stdout/stderr appended to `log` (and echoed on failure)."""
    command = [sys.executable, "-m", "esep_jax", *args]
    print("$ esep-jax " + " ".join(args), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if log is not None:
        with open(log, "a") as handle:
            handle.write("$ esep-jax " + " ".join(args) + "\n" + result.stdout + result.stderr + "\n")
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"esep-jax {args[0]} failed (rc {result.returncode})")


def read_qrels_tsv(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (header optional) -> {query_id: {corpus_id: grade}}."""
    qrels: dict[str, dict[str, int]] = collections.defaultdict(dict)
    with open(path) as handle:
        for row in csv.reader(handle, delimiter="\t"):
            if len(row) < 3:
                continue
            try:
                grade = int(float(row[-1]))
            except ValueError:
                continue  # header
            qrels[row[0]][row[-2]] = grade
    return qrels


def sparsify(qrels: dict[str, dict[str, int]], seed: int) -> dict[str, tuple[str, int]]:
    """One positive per query: the highest grade, ties broken by a seeded choice (deterministic order)."""
    rng = np.random.default_rng(seed)
    sparse = {}
    for query in sorted(qrels):
        positives = {doc: grade for doc, grade in qrels[query].items() if grade > 0}
        if not positives:
            continue
        best = max(positives.values())
        tied = sorted(doc for doc, grade in positives.items() if grade == best)
        sparse[query] = (tied[int(rng.integers(len(tied)))], best)
    return sparse


def build_sparse_dataset(args, out: Path) -> Path:
    data = out / "nf_sparse"
    source = Path(args.source)
    qrels_file = out / "qrels_sparse_train.tsv"
    if (data / "dataset.json").exists() and not args.overwrite:
        print(f"reusing {data}")
        return data
    sparse = sparsify(read_qrels_tsv(source / "qrels" / "train.tsv"), args.label_seed)
    with open(qrels_file, "w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query, (doc, grade) in sparse.items():
            handle.write(f"{query}\t{doc}\t{grade}\n")
    embeddings = source / args.embeddings
    cli("ingest", "--corpus", str(embeddings / "corpus.npy"), "--corpus-ids", str(embeddings / "corpus_ids.txt"),
        "--queries", str(embeddings / "queries.npy"), "--query-ids", str(embeddings / "queries_ids.txt"),
        "--qrels", f"train={qrels_file}", "--qrels", f"dev={source / 'qrels' / 'dev.tsv'}",
        "--qrels", f"test={source / 'qrels' / 'test.tsv'}", "--out", str(data), "--name", "nf_sparse",
        "--overwrite", log=out / "log.txt")
    return data


def ensure_mined(data: Path, skips: list[int], k: int, overwrite: bool, log: Path) -> None:
    from esep_jax.data.candidates import candidate_names
    existing = set(candidate_names(str(data)))
    for skip in skips:
        name = f"hard_s{skip}"
        if name in existing and not overwrite:
            continue
        cli("mine", "--data", str(data), "--split", "train", "--name", name, "--k", str(k), "--skip", str(skip),
            "--no-progress", *(["--overwrite"] if name in existing else []), log=log)


def hidden_positive_stats(data: Path, name: str, full_train: dict[str, dict[str, int]]) -> dict:
    """How many of the mined negatives are positives in the full train qrels (and where they were mined)."""
    from esep_jax.data.candidates import read_candidates
    from esep_jax.data.dataset import Dataset
    dataset = Dataset(str(data))
    candidates = read_candidates(dataset, name)
    query_ids, corpus_ids = dataset.ids("queries"), dataset.ids("corpus")
    hidden = np.zeros(candidates.doc_rows.shape, bool)
    for i, query_row in enumerate(candidates.query_rows):
        positives = {doc for doc, grade in full_train.get(query_ids[query_row], {}).items() if grade > 0}
        for j, doc_row in enumerate(candidates.doc_rows[i]):
            hidden[i, j] = doc_row >= 0 and corpus_ids[doc_row] in positives
    valid = candidates.doc_rows >= 0
    info = candidates.info
    return {
        "name": name, "skip": info.get("skip"), "k": candidates.k, "queries": candidates.num_queries,
        "negatives": int(valid.sum()), "hidden_positives": int(hidden.sum()),
        "hidden_rate": float(hidden.sum() / max(1, valid.sum())),
        "queries_with_hidden": float(hidden.any(axis=1).mean()),
        "hidden_per_query": float(hidden.sum(axis=1).mean()),
        # Hidden-positive rate by slot of the kept list (slot 0 = hardest kept negative), in 4 equal bands.
        "hidden_rate_by_quarter": [float(hidden[:, b].sum() / max(1, valid[:, b].sum()))
                                   for b in np.array_split(np.arange(candidates.k), 4)],
        "judged_fraction_of_top": info.get("judged_fraction_of_top"),
    }


def run_name(skip: int | None, seed: int) -> str:
    return f"{'none' if skip is None else f's{skip}'}_seed{seed}"


def train_and_eval(args, data: Path, out: Path, skip: int | None, seed: int) -> dict:
    name = run_name(skip, seed)
    workdir = out / "runs" / name
    results = {}
    evals = {split: out / "eval" / f"{name}_{split}.json" for split in ("dev", "test")}
    log = out / "logs" / f"{name}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not all(path.exists() for path in evals.values()) or args.overwrite:
        overrides = ["--config.loss.kind=sampled", f"--config.train.seed={seed}"]
        if skip is not None:
            overrides.append(f"--config.loss.hard_negatives=hard_s{skip}")
        overrides += [f"--config.{item}" for item in args.set]
        cli("train", "--data", str(data), "--workdir", str(workdir), "--config", args.config, *overrides,
            "--no-progress", log=log)
        for split, path in evals.items():
            cli("eval", "--data", str(data), "--split", split, "--workdir", str(workdir), "--json", str(path),
                log=log)
    for split, path in evals.items():
        result = json.loads(path.read_text())
        results[split] = {"head": result["head"]["ndcg@10"], "base": result["base"]["ndcg@10"],
                          "best_step": result["run"]["best_step"]}
    return {"run": name, "skip": skip, "seed": seed, "workdir": str(workdir), "seconds": round(time.time() - start),
            "dev_ndcg10": results["dev"]["head"], "test_ndcg10": results["test"]["head"],
            "base_dev_ndcg10": results["dev"]["base"], "base_test_ndcg10": results["test"]["base"],
            "best_step": results["dev"]["best_step"]}


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def markdown(summary: dict) -> str:
    mining = {row["skip"]: row for row in summary["mining_sparse"]}
    dense = {row["skip"]: row for row in summary.get("mining_dense", [])}
    lines = ["| hard negatives | hidden positives (sparse labels) | queries with one | dense: judged share of raw "
             "top S+k | runs | dev nDCG@10 | test nDCG@10 |", "|---|---|---|---|---|---|---|"]
    base = summary["runs"][0] if summary["runs"] else None
    if base:
        lines.append(f"| base (no head) | | | | | {base['base_dev_ndcg10']:.4f} | {base['base_test_ndcg10']:.4f} |")
    groups = collections.defaultdict(list)
    for row in summary["runs"]:
        groups[row["skip"]].append(row)
    skips = sorted(set(mining) | {s for s in groups if s is not None}) + ([None] if None in groups else [])
    for skip in skips:
        label = "none (random only)" if skip is None else f"skip {skip}"
        m, d, rows = mining.get(skip), dense.get(skip), groups.get(skip, [])
        hidden = f"{100 * m['hidden_rate']:.1f}%" if m else ""
        queries = f"{100 * m['queries_with_hidden']:.0f}%" if m else ""
        judged = f"{100 * d['judged_fraction_of_top']:.1f}%" if d and d.get("judged_fraction_of_top") is not None \
            else ""
        if rows:
            dev = [r["dev_ndcg10"] for r in rows]
            test = [r["test_ndcg10"] for r in rows]
            fmt = lambda v: f"{np.mean(v):.4f}" + (f" (±{np.std(v):.4f})" if len(v) > 1 else "")
            lines.append(f"| {label} | {hidden} | {queries} | {judged} | {len(rows)} | {fmt(dev)} | {fmt(test)} |")
        else:
            lines.append(f"| {label} | {hidden} | {queries} | {judged} | 0 | | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--source", default="/work/shared/data/nfcorpus",
                        help="NFCorpus directory with EMB/{corpus,queries}.npy, *_ids.txt and qrels/*.tsv")
    parser.add_argument("--embeddings", default="minilm", help="embedding subdirectory of --source")
    parser.add_argument("--dense-data", default="/tmp/nf", help="the dense-label dataset (compare mining stats); "
                        "'' to skip")
    parser.add_argument("--out", default="/tmp/skip", help="output directory (sparse dataset, runs, summary.json)")
    parser.add_argument("--config", default="configs/nfcorpus.py")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="extra config override for every run (repeatable)")
    parser.add_argument("--k", type=int, default=32, help="hard negatives per query")
    parser.add_argument("--label-seed", type=int, default=0, help="seed of the one-positive-per-query choice")
    parser.add_argument("--mine-skips", type=ints, default=[0, 3, 10, 30])
    parser.add_argument("--train-skips", type=ints, default=[0, 10, 30],
                        help="skips trained with (plus a run without hard negatives)")
    parser.add_argument("--seeds", type=ints, default=[0], help="training seeds of every train skip")
    parser.add_argument("--extra-seed-skips", type=ints, default=[], help="skips that also get --extra-seeds "
                        "(-1: the run without hard negatives)")
    parser.add_argument("--extra-seeds", type=ints, default=[])
    parser.add_argument("--no-train", action="store_true", help="mining statistics only")
    parser.add_argument("--overwrite", action="store_true", help="redo finished steps")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = {"args": vars(args), "mining_sparse": [], "mining_dense": [], "runs": []}
    full_train = read_qrels_tsv(Path(args.source) / "qrels" / "train.tsv")

    data = build_sparse_dataset(args, out)
    from esep_jax.data.dataset import Dataset
    judged = Dataset(str(data)).manifest["splits"]["train"]
    summary["sparse_dataset"] = {"path": str(data), "train_queries": judged["queries"],
                                 "train_judgements": judged["judgements"],
                                 "full_train_judgements": sum(len(v) for v in full_train.values())}
    ensure_mined(data, args.mine_skips, args.k, args.overwrite, out / "log.txt")
    summary["mining_sparse"] = [hidden_positive_stats(data, f"hard_s{s}", full_train) for s in args.mine_skips]
    if args.dense_data:
        ensure_mined(Path(args.dense_data), args.mine_skips, args.k, False, out / "log.txt")
        summary["mining_dense"] = [hidden_positive_stats(Path(args.dense_data), f"hard_s{s}", full_train)
                                   for s in args.mine_skips]
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    if not args.no_train:
        plan = [(skip, seed) for skip in [*args.train_skips, None] for seed in args.seeds]
        plan += [(None if skip < 0 else skip, seed) for skip in args.extra_seed_skips for seed in args.extra_seeds]
        for skip, seed in plan:
            summary["runs"].append(train_and_eval(args, data, out, skip, seed))
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
            print(json.dumps(summary["runs"][-1]), flush=True)

    table = markdown(summary)
    summary["table"] = table
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print(f"\nwrote {summary_path}")


if __name__ == "__main__":
    main()
