"""Benchmark results as JSON, a markdown table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from esep_jax.atomic import atomic_write_text

COLUMNS = [("devices", "dev", "{}"), ("members", "E", "{}"), ("corpus_size", "N", "{:,}"), ("dim", "d", "{}"), ("batch", "B", "{:,}"),
           ("dtype", "dtype", "{}"), ("step_s", "step s", "{:.3f}"), ("achieved_flops", "GFLOP/s", "{:.0f}"),
           ("utilization", "utilisation", "{:.2f}"), ("pairs_per_s", "pairs/s", "{:.3g}"),
           ("peak_bytes", "peak MiB", "{:.0f}"), ("corpus_bytes", "corpus MiB", "{:.0f}"),
           ("per_member_cost", "cost/member", "{:.2f}"), ("torch_ratio", "× torch", "{:.1f}"),
           ("torch_status", "torch", "{}")]


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None:
        return "–"
    if key.endswith("_bytes"):
        value = value / 2**20
    if key == "achieved_flops":
        value = value / 1e9
    return fmt.format(value)


def markdown_table(records: list[dict]) -> str:
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(_cell(r, key, fmt) for key, _, fmt in COLUMNS) + " |" for r in records]
    return "\n".join([header, rule, *rows]) + "\n"


def write_results(records: list[dict], json_path: str | None, markdown_path: str | None,
                  plot_path: str | None) -> None:
    """JSON: the first configuration's figures at top level, every configuration under `records`."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps({**records[0], "records": records}, indent=2) + "\n")
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(markdown_path, markdown_table(records))
    if plot_path:
        plot(records, plot_path)


def plot(records: list[dict], path: str) -> None:
    """Utilisation and pairs/s against corpus size, one line per (d, B, devices, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record["dim"], record["batch"], record["devices"], record["dtype"], record.get("members", 1))
        groups.setdefault(key, []).append(record)
    for (dim, batch, devices, dtype, members), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["corpus_size"])
        label = f"d={dim} B={batch} dev={devices} {dtype}" + (f" E={members}" if members > 1 else "")
        sizes = [r["corpus_size"] for r in rows]
        left.plot(sizes, [r["utilization"] for r in rows], marker="o", label=label)
        right.plot(sizes, [r["pairs_per_s"] for r in rows], marker="o", label=label)
        torch_rows = [r for r in rows if r.get("torch_pairs_per_s")]
        if torch_rows:
            right.plot([r["corpus_size"] for r in torch_rows], [r["torch_pairs_per_s"] for r in torch_rows],
                       marker="x", linestyle="--", label=f"PyTorch plain, d={dim} B={batch}")
    left.axhline(0.7, color="grey", linestyle=":", linewidth=1)
    for axis, title in ((left, "utilisation (step FLOP/s ÷ matmul FLOP/s)"), (right, "pairs / s")):
        axis.set_xscale("log")
        axis.set_xlabel("corpus size N")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.set_ylim(0, 1.05)
    right.legend(fontsize=7)
    figure.suptitle(f"full-corpus softmax train step — {records[0].get('device_kind', '')}", fontsize=11)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
