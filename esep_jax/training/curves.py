"""`train_curves.png`: a run's training loss and dev metric against step, one line per member.

Drawn from `metrics.jsonl` when training ends (the log is the record; the picture is its summary), with the
base embeddings' dev score as a reference line and the selected step of each member marked.
"""

from __future__ import annotations

import json
from pathlib import Path

CURVES_FILE = "train_curves.png"


def plot_training_curves(metrics_path: Path, out: Path, metric: str = "ndcg@10", best_steps=None) -> None:
    """Writes the two-panel PNG (loss | dev metric) for the run whose log is `metrics_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss: dict[int, list[tuple[int, float]]] = {}
    dev: dict[int, list[tuple[int, float]]] = {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses = record.get("member_loss") or [record.get("loss")]
            for member, value in enumerate(losses):
                if value is not None:
                    loss.setdefault(member, []).append((record["step"], value))
        elif record["kind"] == "dev" and record.get(metric) is not None:
            dev.setdefault(record.get("member", 0), []).append((record["step"], record[metric]))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for member, points in sorted(loss.items()):
        steps, values = zip(*points)
        left.plot(steps, values, linewidth=1, label=f"member {member}")
    left.set(xlabel="step", ylabel="training loss", title="loss")
    base = None
    for member, points in sorted(dev.items()):
        steps, values = zip(*sorted(points))
        base = values[0] if steps[0] == 0 else base
        (line,) = right.plot(steps, values, linewidth=1, marker=".", label=f"member {member}")
        if best_steps is not None and member < len(best_steps):
            best = dict(points).get(int(best_steps[member]))
            if best is not None:
                right.plot([best_steps[member]], [best], "o", color=line.get_color(), markersize=7)
    if base is not None:
        right.axhline(base, color="grey", linestyle="--", linewidth=0.8, label="base embeddings")
    right.set(xlabel="step", ylabel=f"dev {metric}", title=f"dev {metric} (o: selected)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if len(loss) <= 8:
            axis.legend(fontsize=7)
    figure.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(out)
