"""`esep-jax sweep`: trials expand, group by shape, train as ensembles, and rank in a leaderboard."""

from __future__ import annotations

import csv

import pytest

from esep_jax.cli import main
from esep_jax.config import Config
from esep_jax.errors import InputError
from esep_jax.training.sweep import expand, group_trials


def test_grid_groups_by_shape_and_maps_the_rest_onto_members():
    trials = expand({"grid": {"model.head": ["linear", "lowrank"], "optim.learning_rate": [1e-3, 3e-4],
                              "loss.temperature": [0.05, 0.1]}})
    assert len(trials) == 8
    groups = group_trials(Config(), trials)
    assert sorted(config.model.head for config, _ in groups) == ["linear", "lowrank"]
    for config, members in groups:
        assert config.ensemble.members == 4 == len(members)
        assert config.ensemble.learning_rate == tuple(m["optim.learning_rate"] for m in members)


def test_random_search_is_seeded_and_checked():
    spec = {"random": {"optim.learning_rate": ("log", 1e-4, 1e-2), "model.rank": [8, 16]}, "samples": 5, "seed": 3}
    first, second = expand(spec), expand(spec)
    assert first == second and len(first) == 5
    assert all(1e-4 <= t["optim.learning_rate"] <= 1e-2 for t in first)
    with pytest.raises(InputError, match="unknown config field"):
        group_trials(Config(), [{"optim.learnin_rate": 1}])


def test_sweep_writes_leaderboard_and_plots(synthetic_dataset, tmp_path):
    sweep_file = tmp_path / "sweep.py"
    sweep_file.write_text(
        "from esep_jax.config import Config, override\n"
        "def get_config():\n    return override(Config(), {'train.num_steps': 30, 'train.eval_every': 10,"
        " 'train.batch_size': 32, 'optim.warmup_steps': 5, 'optim.weight_decay': 1e-4, 'model.rank': 4})\n"
        "def get_sweep():\n    return {'grid': {'model.head': ['linear', 'lowrank'],"
        " 'optim.learning_rate': [1e-3, 1e-2]}}\n")
    workdir = tmp_path / "sweep"
    assert main(["sweep", "--config", str(sweep_file), "--data", synthetic_dataset, "--workdir", str(workdir),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader(open(workdir / "leaderboard.csv")))
    assert len(rows) == 4 and {r["model.head"] for r in rows} == {"linear", "lowrank"}
    dev = [float(r["dev_ndcg@10"]) for r in rows]
    assert dev == sorted(dev, reverse=True)
    assert all(float(r["test_ndcg@10"]) > 0 for r in rows)
    for name in ("dev_curves.png", "hyperparameters.png"):
        assert (workdir / name).read_bytes()[:4] == b"\x89PNG"
    assert "| group |" in (workdir / "leaderboard.md").read_text()
