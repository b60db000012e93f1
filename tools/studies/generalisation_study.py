"""Generalisation study: heads trained on each dataset, measured in-domain, on new documents and zero-shot.

For every `--variant "NAME;field=value;..."` (after the `--set` overrides common to all; `config=FILE` starts the
variant from a config file instead of the defaults) and every `--seed`, a
head is trained on each `--train` dataset with the real trainer (`WORKROOT/NAME/s<seed>/<dataset>`) and
evaluated with `esep-jax eval`'s report on every `--dataset`: its own (in-domain, with the new-documents view
of a dataset made by `esep-jax new-documents`) and the others (zero-shot: same encoder, another corpus). One
markdown table per variant, nDCG@10 (mean over seeds, Δ in points against the base), written with the JSON to
`WORKROOT/study.{md,json}`. The README's "Heads that generalise" tables come from:

    python tools/studies/generalisation_study.py --workroot /tmp/gen \\
        --dataset nf=/tmp/nfcorpus --dataset nf-new=/tmp/nf-new --dataset pystdlib=/tmp/demo \\
        --dataset modules=/tmp/demo-modules --dataset msmarco=/tmp/msmarco \\
        --train nf --train nf-new --train pystdlib --train modules --group nf,nf-new --group pystdlib,modules \\
        --variant "defaults" --variant "all negatives, no gate;loss.negatives=all;model.gate=none" \\
        --variant "generalising ensemble;config=configs/generalising_ensemble.py"

Existing runs are reused (rerunning resumes or skips them), so a study can be extended variant by variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def parse_named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise SystemExit(f"expected NAME=PATH, got {text!r}")
    return name, value


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, *overrides = [part.strip() for part in text.split(";") if part.strip()]
    return name, overrides


def columns(datasets: dict[str, str], trained: list[str], groups: list[set[str]] = ()) -> list[tuple[str, str, str]]:
    """(trained-on, evaluated-on, view) per table column: own test, own new documents, then zero-shot — on the
    datasets outside the trained one's `groups` (datasets of one group share a corpus: not zero-shot, and only
    the first of a group is another dataset's zero-shot column)."""
    out = []
    for train in trained:
        related = set().union(*[g for g in groups if train in g]) if groups else set()
        out.append((train, train, "test"))
        out.append((train, train, "new_documents"))
        covered = set(related)
        for target in datasets:  # one zero-shot column per corpus: the first dataset named of each group
            if target != train and target not in covered:
                out.append((train, target, "test"))
                covered |= set().union({target}, *[g for g in groups if target in g])
    return out


def measure(workdir: Path, datasets: dict[str, str], train: str, split: str, skip: set[str] = frozenset()) -> dict:
    """{(train, target, view): (base, head) nDCG@10} on the trained dataset and every other one not in `skip`."""
    from esep_jax.evaluation.report import evaluate_targets

    names = [train, *[n for n in datasets if n != train and n not in skip]]
    results = evaluate_targets([datasets[n] for n in names], split, workdir=str(workdir))
    out = {}
    for name, result in zip(names, results):
        out[(train, name, "test")] = (result["base"]["ndcg@10"], result["head"]["ndcg@10"])
        view = result.get("subsets", {}).get("new_documents")
        if name == train and view:
            out[(train, name, "new_documents")] = (view["base"]["ndcg@10"], view["head"]["ndcg@10"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workroot", required=True, help="one workdir per variant, seed and trained dataset")
    parser.add_argument("--dataset", action="append", default=[], type=parse_named, metavar="NAME=PATH",
                        help="a dataset (ingested); repeat")
    parser.add_argument("--train", action="append", default=[], metavar="NAME", help="train a head on it; repeat")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant,
                        metavar="NAME;FIELD=VALUE;...", help="a configuration (default: the defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="for every variant")
    parser.add_argument("--seed", action="append", type=int, default=[], help="train.seed values (default 0)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--group", action="append", default=[], metavar="NAME,NAME,...",
                        help="datasets that share a corpus (views or re-splits of one dataset): never each "
                             "other's zero-shot targets; repeat")
    args = parser.parse_args(argv)
    datasets = dict(args.dataset)
    groups = [set(group.split(",")) for group in args.group]
    unknown = [name for name in args.train if name not in datasets]
    if unknown or not args.train:
        parser.error(f"--train needs names given with --dataset (unknown: {unknown})")
    variants = args.variant or [("defaults", [])]
    seeds = args.seed or [0]

    from esep_jax.config import load_config
    from esep_jax.training.loop import train_and_evaluate

    root = Path(args.workroot)
    record, tables = {}, []
    for name, overrides in variants:
        per_seed = []
        for seed in seeds:
            measured = {}
            for train in args.train:
                workdir = root / name.replace(" ", "_").replace(",", "") / f"s{seed}" / train
                config_file = next((o.split("=", 1)[1] for o in overrides if o.startswith("config=")), None)
                fields = [o for o in overrides if not o.startswith("config=")]
                config = load_config(config_file, [*args.set, *fields, f"train.seed={seed}"])
                if not (workdir / "summary.json").exists():
                    train_and_evaluate(config, datasets[train], workdir, progress=False)
                related = set().union(*[g for g in groups if train in g]) if groups else set()
                measured.update(measure(workdir, datasets, train, args.split, skip=related))
            per_seed.append(measured)
        record[name] = {"overrides": overrides, "seeds": seeds,
                        "cells": [{" | ".join(key): value for key, value in m.items()} for m in per_seed]}
        tables.append(f"**{name}** ({'; '.join(overrides) or 'defaults'}; seeds {', '.join(map(str, seeds))})\n\n"
                      + _table(per_seed, columns(datasets, args.train, groups)))
    text = "\n\n".join(tables) + "\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.md").write_text(text)
    (root / "study.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text, end="")
    return 0


def _table(per_seed: list[dict], wanted: list[tuple[str, str, str]]) -> str:
    present = [column for column in wanted if all(column in m for m in per_seed)]
    header = "| trained on → evaluated on | base | head | Δ points (min, max) |\n|---|---|---|---|"
    rows = []
    for column in present:
        base = per_seed[0][column][0]
        heads = np.array([m[column][1] for m in per_seed])
        deltas = 100 * (heads - base)
        label = (f"{column[0]} → {column[1]}" + (" (new documents)" if column[2] == "new_documents" else "")
                 + (" (zero-shot)" if column[0] != column[1] else ""))
        rows.append(f"| {label} | {base:.4f} | {heads.mean():.4f} | {deltas.mean():+.2f} "
                    f"({deltas.min():+.2f}, {deltas.max():+.2f}) |")
    return "\n".join([header, *rows])


if __name__ == "__main__":
    sys.exit(main())
