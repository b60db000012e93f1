"""Heads that do not learn a document prior: the new-documents views, the in-domain gate, logit adjustment,
the harm test, and the multi-dataset eval report."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ingest_args, write_synthetic_sources
from esep_jax.cli import main
from esep_jax.data.dataset import Dataset, Qrels
from esep_jax.evaluation.views import harm_test, hold_out_documents
from esep_jax.heads.gate import blend, calibrate, gate_weights, similarity
from esep_jax.objectives.full_corpus import full_corpus_softmax_loss, logit_adjustment

FAST = ["--config.train.num_steps=40", "--config.train.eval_every=10", "--config.train.batch_size=32",
        "--config.optim.weight_decay=1e-4", "--config.optim.learning_rate=1e-2", "--no-progress"]


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_gate_opens_on_training_like_queries_and_closes_far_from_them():
    rng = np.random.default_rng(0)
    centre = _unit(rng.normal(size=(1, 32)))
    train = _unit(centre + 0.3 * rng.normal(size=(400, 32)))
    near = _unit(centre + 0.3 * rng.normal(size=(50, 32)))
    far = _unit(-centre + 0.3 * rng.normal(size=(50, 32)))
    gate = calibrate(train, neighbours=10, width=0.1, quantile=0.01, max_anchors=300, seed=0)
    assert gate.anchors.shape == (300, 32) and np.allclose(np.linalg.norm(gate.anchors, axis=1), 1)
    # upper is the 1 % quantile of the anchors' own leave-one-out similarity: ~99 % of them fully on
    own = similarity(gate.anchors, gate.anchors, 10, exclude_self=True)
    assert np.mean(own >= gate.upper) >= 0.98 and gate.lower == pytest.approx(gate.upper - 0.1)
    assert gate_weights(gate, near).mean() > 0.95 and gate_weights(gate, far).max() == 0.0
    base, head = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    np.testing.assert_allclose(blend(base, head, np.array([0.0, 1.0, 0.5, 0.0], np.float32)),
                               [base[0], head[1], (base[2] + head[2]) / 2, base[3]], rtol=1e-6)


def test_leave_one_out_similarity_ignores_the_query_itself():
    anchors = _unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    own = similarity(anchors, anchors, 1, exclude_self=True)
    np.testing.assert_allclose(own, [np.sqrt(0.5)] * 3, rtol=1e-6)  # each one's nearest *other* anchor


def test_logit_adjustment_is_the_log_prior_of_the_training_target_mass():
    # query 0: docs 0 (grade 1) and 1 (grade 3); query 1: doc 1. Mass: doc 0 = 1/4, doc 1 = 3/4 + 1, doc 2 = 0.
    qrels = Qrels.from_lists([0, 1], [(np.array([0, 1]), np.array([1, 3])), (np.array([1]), np.array([2]))])
    bias = logit_adjustment(qrels, 3, strength=0.5, smoothing=1.0)
    prior = np.array([0.25, 1.75, 0.0]) / 2.0
    np.testing.assert_allclose(bias, 0.5 * np.log(prior + 1.0 / 3), rtol=1e-6)


def test_the_full_corpus_term_adds_the_logit_bias_inside_the_softmax(synthetic_dataset):
    from esep_jax.objectives.corpus_softmax import ShardedCorpus, make_corpus_softmax_loss, make_data_corpus_mesh

    rng = np.random.default_rng(1)
    corpus = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    ids = rng.integers(0, 50, (6, 3)).astype(np.int32)
    weights = np.ones((6, 3), np.float32)
    bias = rng.normal(size=50).astype(np.float32)
    mesh = make_data_corpus_mesh(1)
    sharded = ShardedCorpus(corpus, mesh, chunk=16, logit_bias=bias)
    loss = make_corpus_softmax_loss(mesh, temperature=1.0, chunk=16)(jnp.asarray(queries), sharded, ids, weights)
    # The adjusted loss is the plain one on logits + bias: fold the bias in as an extra coordinate.
    augmented_q = np.concatenate([queries, np.ones((6, 1), np.float32)], axis=1)
    augmented_c = np.concatenate([corpus, bias[:, None]], axis=1)
    expected = full_corpus_softmax_loss(jnp.asarray(augmented_q), jnp.asarray(augmented_c), ids, weights, 1.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_holding_out_documents_drops_exactly_their_training_judgements():
    rng = np.random.default_rng(2)
    train = Qrels.from_lists(np.arange(40), [(rng.choice(30, 5, replace=False), np.ones(5, int)) for _ in range(40)])
    dev = Qrels.from_lists(np.arange(40, 50), [(rng.choice(30, 4, replace=False), np.ones(4, int)) for _ in range(10)])
    reduced, held = hold_out_documents(train, dev, 0.3, seed=0)
    candidates = np.intersect1d(train.doc_rows, dev.doc_rows)
    assert held.size == round(0.3 * candidates.size) and np.isin(held, candidates).all()
    assert not np.isin(reduced.doc_rows, held).any()
    assert reduced.grades.size == (~np.isin(train.doc_rows, held)).sum()  # nothing else removed
    assert np.array_equal(hold_out_documents(train, dev, 0.3, seed=0)[1], held)  # seeded
    assert hold_out_documents(train, dev, 0.0, seed=0)[0] is train


def test_the_harm_test_needs_a_loss_beyond_tolerance_and_beyond_noise():
    rng = np.random.default_rng(3)
    base = rng.uniform(size=200)
    assert harm_test(base, base - 0.05, 0.005)["harmful"]  # a consistent loss
    noisy = base + rng.normal(0, 0.3, size=200)
    assert not harm_test(base, noisy + 0.01, 0.005)["harmful"]
    assert not harm_test(base, base - 0.003, 0.005)["harmful"]  # within tolerance
    one_bad = base.copy()
    one_bad[0] -= 1.0
    assert not harm_test(base[:20], one_bad[:20], 0.005)["harmful"]  # one unlucky query of 20 is not evidence


def test_new_documents_dataset_and_its_test_view(synthetic_dataset, tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["new-documents", "--data", synthetic_dataset, "--out", str(out), "--fraction", "0.25"]) == 0
    source, new = Dataset(synthetic_dataset), Dataset(str(out))
    rows = new.new_documents
    assert rows.size == 100 and new.manifest["new_documents"]["seed"] == 0
    for split in ("train", "dev"):
        assert not np.isin(new.qrels(split).doc_rows, rows).any()
    test_old, test_new = source.qrels("test"), new.qrels("test")
    assert np.array_equal(test_old.doc_rows, test_new.doc_rows)  # test judgements kept whole
    np.testing.assert_array_equal(new.read_corpus(), source.read_corpus())
    assert main(["new-documents", "--data", str(out), "--out", str(tmp_path / "again")]) == 2  # not twice
    workdir = tmp_path / "run"
    assert main(["train", "--data", str(out), "--workdir", str(workdir), *FAST]) == 0
    capsys.readouterr()
    assert main(["eval", "--data", str(out), "--workdir", str(workdir), "--json", str(tmp_path / "e.json")]) == 0
    assert "new_documents: " in capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())
    view = result["subsets"]["new_documents"]
    has_new = [bool(np.isin(test_new.judgements(i)[0][test_new.judgements(i)[1] >= 1], rows).any())
               for i in range(test_new.num_queries)]
    assert view["queries"] == sum(has_new) and "head" in view and result["zero_shot"] is False


def _prior_biased_dev(synthetic_dataset):
    """(DevSelection with half the dev-relevant documents held out of training, base dev vectors, the same
    vectors pulled towards the mean training positive: a head that learnt the document prior)."""
    from esep_jax.config import Config
    from esep_jax.evaluation.retrieval import ExactIndex
    from esep_jax.evaluation.views import hold_out_documents
    from esep_jax.training.early_stopping import DevSelection

    dataset = Dataset(synthetic_dataset)
    train, _ = hold_out_documents(dataset.qrels("train"), dataset.qrels("dev"), 0.5, seed=0)
    seen = np.zeros(dataset.num_documents, bool)
    seen[train.doc_rows] = True
    corpus = dataset.read_corpus()
    dev = DevSelection(Config(), dataset, dataset.qrels("dev"), ExactIndex(corpus), seen=seen)
    base = dev.evaluator.base_vectors()
    prior = corpus[seen].mean(axis=0)
    return dev, base, base + 3.0 * prior / np.linalg.norm(prior)


def test_a_head_that_favours_training_positives_is_flagged_on_the_new_documents_view(synthetic_dataset):
    """DevSelection on real dev data: query vectors pulled towards the training positives lose on the documents
    held out of training, and the paired harm test says so; the base itself is never flagged."""
    dev, base, biased = _prior_biased_dev(synthetic_dataset)
    harm = dev.harm(biased, 0.005)
    assert harm["queries"] > 20 and harm["mean_delta"] < -0.005 and harm["harmful"]
    assert not dev.harm(base, 0.005)["harmful"] and dev.harm(base, 0.005)["mean_delta"] == 0.0
    assert dev.views(biased)["new_documents"]["ndcg@10"] < dev.views(base)["new_documents"]["ndcg@10"]


def test_worst_case_combination_scores_the_smaller_gain_and_trains_an_ensemble(synthetic_dataset, tmp_path):
    """`ensemble.combine="worst_case"`: a vector set's score is min(in-domain gain, new-documents gain), so the
    prior-biased vectors above score their (negative) new-documents gain; a run combines its members by it."""
    dev, base_vectors, biased = _prior_biased_dev(synthetic_dataset)
    base = dev.base_metrics()
    metrics = dev.views(biased)
    gains = (metrics["ndcg@10"] - base["ndcg@10"],
             metrics["new_documents"]["ndcg@10"] - base["new_documents"]["ndcg@10"])
    assert dev.worst_case_gain(biased, base) == pytest.approx(min(gains)) and min(gains) < 0
    assert dev.worst_case_gain(base_vectors, base) == 0.0

    workdir = tmp_path / "run"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST,
                 "--config.ensemble.members=3", "--config.ensemble.temperature=0.02,0.05,0.1",
                 "--config.ensemble.combine=worst_case"]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert len(summary["weights"]) == 3 and sum(summary["weights"]) == pytest.approx(1.0)
    assert "new_documents" in summary["best_dev"]


def test_a_harmful_run_is_reported_loudly_and_export_refuses_it(synthetic_dataset, tmp_path, capsys):
    from esep_jax.cli.train_commands import report_lines

    workdir = tmp_path / "run"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST]) == 0
    summary_path = workdir / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert "new_documents" in summary["base_dev"] and summary["harm_test"]["queries"] > 0
    summary.update(harmful=True, harm_test={"queries": 40, "mean_delta": -0.03, "t": -3.1, "harmful": True})
    summary["best_dev"]["new_documents"]["ndcg@10"] = summary["base_dev"]["new_documents"]["ndcg@10"] - 0.03
    out, err = report_lines(summary)
    assert any("WARNING: the head is worse than the base embeddings" in line and "-0.0300" in line for line in err)
    summary_path.write_text(json.dumps(summary))  # as a run that trained a harmful head leaves it
    capsys.readouterr()
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "bundle")]) == 2
    assert "--allow-harmful-head" in capsys.readouterr().err and not (tmp_path / "bundle").exists()
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "bundle"), "--allow-harmful-head"]) == 0
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["training"]["dev"]["harmful"] is True


def test_one_report_over_datasets_marks_zero_shot_rows(synthetic_dataset, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(ingest_args(write_synthetic_sources(tmp_path / "src", seed=5), other)) == 0
    workdir = tmp_path / "run"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST]) == 0
    capsys.readouterr()
    assert main(["eval", "--data", synthetic_dataset, "--data", str(other), "--workdir", str(workdir),
                 "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].startswith(f"run {workdir}") and "gate knn" in lines[0]
    assert "(zero-shot)" not in lines[2] and "other / test (zero-shot)" in table
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["zero_shot"] for r in results] == [False, True] and all(0 <= r["gate"] <= 1 for r in results)


def test_the_exported_bundle_serves_the_gated_head(synthetic_dataset, tmp_path):
    from esep_jax.runs.trained_run import TrainedRun
    from esep_jax.serving import Searcher

    workdir, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST]) == 0
    assert main(["export", "--workdir", str(workdir), "--out", str(bundle)]) == 0
    run, searcher = TrainedRun.load(workdir), Searcher.load(bundle)
    assert run.gate is not None and searcher.manifest["head"]["gate"]["anchors"] == run.gate.anchors.shape[0]
    rng = np.random.default_rng(0)
    queries = np.concatenate([Dataset(synthetic_dataset).read_queries(np.arange(20)),
                              _unit(rng.normal(size=(20, 16))).astype(np.float32)])  # in-domain and random
    np.testing.assert_allclose(searcher.transform(queries), run.transform(queries), atol=1e-5)
    assert gate_weights(run.gate, queries[20:]).mean() < gate_weights(run.gate, queries[:20]).mean()
