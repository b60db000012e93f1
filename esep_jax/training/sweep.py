"""`esep-jax sweep`: a grid or random search mapped onto ensemble members, with a leaderboard and plots.

A sweep file is a config file with a second function, `get_sweep() -> dict`:

    {"grid": {"optim.learning_rate": [1e-3, 3e-4], "loss.temperature": [0.03, 0.05], "model.rank": [16, 64]}}
    {"random": {"optim.learning_rate": ("log", 1e-4, 1e-2), "loss.recovery_weight": [0.3, 1, 3]},
     "samples": 16, "seed": 0}

Hyperparameters an ensemble can vary per member (learning rate, weight decay, temperature, recovery weight,
dropout) become members of one run; every other combination (a head's shape, a loss kind) becomes its own
group — one compiled ensemble per group, each in `WORKDIR/group-NN`. The leaderboard ranks every member of
every group by its best dev score and shows its test score.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np

from esep_jax.atomic import atomic_write_text
from esep_jax.config import PER_MEMBER, Config, get_field, load_config, load_module, override, validate
from esep_jax.errors import InputError

MEMBER_FIELDS = {dotted: name for name, dotted in PER_MEMBER.items()}


def expand(sweep: dict) -> list[dict[str, object]]:
    """The list of trials (dotted field -> value) a sweep spec describes."""
    if "grid" in sweep:
        names = list(sweep["grid"])
        return [dict(zip(names, values)) for values in itertools.product(*(sweep["grid"][n] for n in names))]
    if "random" in sweep:
        rng = np.random.default_rng(sweep.get("seed", 0))
        trials = []
        for _ in range(int(sweep.get("samples", 8))):
            trial = {}
            for name, space in sweep["random"].items():
                if isinstance(space, tuple) and space[0] == "log":
                    trial[name] = float(math.exp(rng.uniform(math.log(space[1]), math.log(space[2]))))
                elif isinstance(space, tuple) and space[0] == "uniform":
                    trial[name] = float(rng.uniform(space[1], space[2]))
                else:
                    trial[name] = space[int(rng.integers(len(space)))]
            trials.append(trial)
        return trials
    raise InputError("get_sweep() must return {'grid': {...}} or {'random': {...}, 'samples': N}")


def group_trials(base: Config, trials: list[dict]) -> list[tuple[Config, list[dict]]]:
    """Trials sharing every non-member field form one ensemble config (members = the group's trials)."""
    groups: dict[tuple, list[dict]] = {}
    for trial in trials:
        unknown = [name for name in trial if not _is_field(base, name)]
        if unknown:
            raise InputError(f"unknown config field(s) {unknown}", field="get_sweep()")
        key = tuple(sorted((k, repr(v)) for k, v in trial.items() if k not in MEMBER_FIELDS))
        groups.setdefault(key, []).append(trial)
    configs = []
    for members in groups.values():
        changes = {name: value for name, value in members[0].items() if name not in MEMBER_FIELDS}
        changes["ensemble.members"] = len(members)
        for dotted, field in MEMBER_FIELDS.items():
            if any(dotted in trial for trial in members):
                default = get_field(base, dotted)
                changes[f"ensemble.{field}"] = tuple(float(trial.get(dotted, default)) for trial in members)
        configs.append((validate(override(base, changes)), members))
    return configs


def _is_field(config: Config, dotted: str) -> bool:
    try:
        get_field(config, dotted)
        return True
    except AttributeError:
        return False


def run_sweep(sweep_file: str, data: str, workdir: str, overrides=(), progress: bool = True,
              test_split: str = "test") -> list[dict]:
    """Trains every group, evaluates every member on dev and test, writes the leaderboard and plots."""
    from esep_jax.data.dataset import Dataset
    from esep_jax.evaluation.evaluator import SplitEvaluator
    from esep_jax.evaluation.retrieval import ExactIndex
    from esep_jax.runs.trained_run import TrainedRun
    from esep_jax.training.loop import train_and_evaluate

    base = load_config(sweep_file, overrides)
    sweep = _sweep_spec(sweep_file)
    root = Path(workdir)
    dataset = Dataset(data)
    groups = group_trials(base, expand(sweep))  # every group's config is checked before the first trains
    rows = []
    for index, (config, members) in enumerate(groups):
        group_dir = root / f"group-{index:02d}"
        summary = train_and_evaluate(config, data, group_dir, progress=progress)
        run = TrainedRun.load(group_dir)
        test = None
        if test_split in dataset.manifest["splits"]:
            evaluator = SplitEvaluator(dataset, dataset.qrels(test_split), ExactIndex(dataset.read_corpus()),
                                       top_k=config.eval.top_k, relevance_level=config.eval.relevance_level)
            test = [evaluator.rank_vectors(v).metrics["ndcg@10"] for v in run.member_vectors(evaluator.queries)]
        for member, trial in enumerate(members):
            rows.append({"group": index, "member": member, **{k: trial[k] for k in sorted(trial)},
                         "best_step": int(run.best_steps[member]),
                         "dev_ndcg@10": summary["member_dev"][member]["ndcg@10"],
                         "test_ndcg@10": None if test is None else test[member],
                         "weight": summary["weights"][member]})
    rows.sort(key=lambda r: -r["dev_ndcg@10"])
    write_leaderboard(rows, root)
    plot_sweep(rows, root)
    return rows


def _sweep_spec(sweep_file: str) -> dict:
    module = load_module(sweep_file)
    if not hasattr(module, "get_sweep"):
        raise InputError("a sweep file must define get_sweep() (and get_config())", file=sweep_file)
    return module.get_sweep()


def write_leaderboard(rows: list[dict], root: Path) -> None:
    """`leaderboard.csv` and `leaderboard.md`, best dev first."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / "leaderboard.csv", buffer.getvalue())

    def cell(value):
        return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    atomic_write_text(root / "leaderboard.md", "\n".join(lines) + "\n")
    atomic_write_text(root / "leaderboard.json", json.dumps(rows, indent=2) + "\n")


def plot_sweep(rows: list[dict], root: Path) -> None:
    """`dev_curves.png` (dev nDCG@10 against step, per member) and `hyperparameters.png` (test nDCG@10
    against each swept hyperparameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for group_dir in sorted(root.glob("group-*")):
        curves: dict[int, list[tuple[int, float]]] = {}
        for line in (group_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == "dev":
                curves.setdefault(record.get("member", 0), []).append((record["step"], record["ndcg@10"]))
        for member, points in sorted(curves.items()):
            steps, scores = zip(*sorted(points))
            axis.plot(steps, scores, linewidth=1, label=f"{group_dir.name}/m{member}")
    axis.set_xlabel("step")
    axis.set_ylabel("dev nDCG@10")
    axis.grid(alpha=0.3)
    if len(rows) <= 16:
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(root / "dev_curves.png", dpi=120)
    plt.close(figure)

    swept = [k for k in rows[0] if "." in k]
    if not swept or rows[0]["test_ndcg@10"] is None:
        return
    figure, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.5), squeeze=False)
    for axis, name in zip(axes[0], swept):
        values = [row[name] for row in rows]
        numeric = all(isinstance(v, (int, float)) for v in values)
        axis.scatter(values if numeric else [str(v) for v in values], [row["test_ndcg@10"] for row in rows])
        if numeric and min(values) > 0 and max(values) / min(values) > 20:
            axis.set_xscale("log")
        axis.set_xlabel(name)
        axis.set_ylabel("test nDCG@10")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(root / "hyperparameters.png", dpi=120)
    plt.close(figure)
