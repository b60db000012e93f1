"""Ensembles: members trained in one program behave as if trained alone, stop separately, and combine."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import final_train_state
from esep_jax.cli import main
from esep_jax.config import load_config, member_values
from esep_jax.heads.ensemble import combine, greedy_selection
from esep_jax.errors import InputError

FAST = ["--config.optim.weight_decay=1e-4", "--config.train.num_steps=40", "--config.train.eval_every=10", "--config.train.checkpoint_every=20",
        "--config.train.batch_size=32", "--config.optim.warmup_steps=5", "--no-progress"]


def test_mean_of_member_vectors_scores_like_the_mean_of_member_scores():
    rng = np.random.default_rng(0)
    vectors, documents = rng.normal(size=(4, 7, 5)), rng.normal(size=(30, 5))
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(combine(vectors, weights) @ documents.T,
                               combine(vectors @ documents.T, weights), rtol=1e-10)


def test_greedy_selection_picks_by_the_dev_score_with_replacement():
    target = np.array([[1.0, 0.0]])
    members = np.array([[[0.0, 1.0]], [[1.0, 0.2]], [[1.0, -0.2]], [[-1.0, 0.0]]])
    weights, best = greedy_selection(members, lambda v: -np.abs(v - target).sum())
    assert weights[3] == 0 and weights[0] == 0  # useless members are never chosen
    assert weights[1] == weights[2] == 0.5  # the pair cancels its errors: better than either alone
    assert best == pytest.approx(0.0)


def test_per_member_values_are_checked():
    config = load_config(None, ["ensemble.members=3", "ensemble.learning_rate=1e-3,3e-3,1e-2"])
    assert member_values(config)["learning_rate"] == (1e-3, 3e-3, 1e-2)
    assert member_values(config)["temperature"] == (0.03,) * 3
    with pytest.raises(InputError, match="2 values for 3 members"):
        load_config(None, ["ensemble.members=3", "ensemble.temperature=0.1,0.2"])
    with pytest.raises(InputError, match="dropout"):
        load_config(None, ["ensemble.members=2", "ensemble.dropout=0.1,1.5"])


def test_an_ensemble_member_trains_as_it_would_alone(synthetic_dataset, tmp_path):
    alone = ["--config.optim.learning_rate=3e-3", "--config.optim.weight_decay=1e-4", "--config.loss.temperature=0.1"]
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(tmp_path / "alone"), *FAST, *alone]) == 0
    # No gate here: the claim below is about greedy selection (the gate then blends a few dev queries back
    # towards the base, which no member's own figure includes).
    together = ["--config.ensemble.members=3", "--config.ensemble.learning_rate=3e-3,1e-2,1e-3",
                "--config.ensemble.temperature=0.1,0.05,0.2", "--config.model.gate=none"]
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(tmp_path / "ensemble"), *FAST,
                 *together]) == 0
    _, single = final_train_state(tmp_path / "alone", synthetic_dataset)
    _, ensemble = final_train_state(tmp_path / "ensemble", synthetic_dataset)
    for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(ensemble.params)):
        assert y.shape[0] == 3
        np.testing.assert_allclose(np.asarray(y[0]), np.asarray(x[0]), rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(jax.tree.leaves(ensemble.params)[0][1]),
                           np.asarray(jax.tree.leaves(ensemble.params)[0][0]))  # members do differ

    summary = json.loads((tmp_path / "ensemble" / "summary.json").read_text())
    assert summary["members"] == 3 and len(summary["best_step"]) == 3
    assert sum(summary["weights"]) == pytest.approx(1.0)
    # The selected combination is at least as good on dev as its best member.
    assert summary["best_dev"]["ndcg@10"] >= max(m["ndcg@10"] for m in summary["member_dev"]) - 1e-9
    dev_lines = [json.loads(line) for line in (tmp_path / "ensemble" / "metrics.jsonl").read_text().splitlines()
                 if '"dev"' in line]
    assert {line["member"] for line in dev_lines} == {0, 1, 2}

    assert main(["eval", "--data", synthetic_dataset, "--split", "test", "--workdir", str(tmp_path / "ensemble"),
                 "--json", str(tmp_path / "t.json")]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["run"]["members"] == 3 and result["ndcg@10"] > result["base"]["ndcg@10"]


def test_members_stop_early_one_by_one(synthetic_dataset, tmp_path):
    # Member 1's learning rate wrecks it at once: it stops (frozen at its best) while member 0 trains on.
    args = ["train", "--data", synthetic_dataset, "--workdir", str(tmp_path / "run"), *FAST,
            "--config.train.patience=2", "--config.ensemble.members=2", "--config.ensemble.learning_rate=1e-2,500",
            "--config.optim.grad_clip_norm=0", "--config.optim.end_learning_rate_fraction=1"]
    assert main(args) == 0
    _, state = final_train_state(tmp_path / "run", synthetic_dataset)
    assert np.asarray(state.stopped).tolist() == [False, True]
    assert np.asarray(state.best_step)[1] == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["weights"][1] == 0
