"""Closed-form query maps (esep_jax.heads.closed_form) and the drift retention report (esep_jax.evaluation.drift)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from esep_jax.heads import closed_form as cf


def random_orthogonal(d: int, seed: int) -> np.ndarray:
    return scipy.stats.ortho_group.rvs(d, random_state=seed)


def test_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(200, 16))
    R = random_orthogonal(16, 1)
    W, b = cf.orthogonal_procrustes(source, source @ R)
    np.testing.assert_allclose(W, R, atol=1e-5)
    np.testing.assert_array_equal(b, 0)
    W, b = cf.orthogonal_procrustes(source + 3.0, source @ R - 1.0, center=True)
    np.testing.assert_allclose(W, R, atol=1e-5)
    np.testing.assert_allclose(cf.apply_map(source + 3.0, (W, b)), source @ R - 1.0, atol=1e-4)


@pytest.mark.parametrize("d_in,d_out", [(8, 20), (20, 8)])
def test_procrustes_across_dims_is_the_padded_solution(d_in, d_out):
    rng = np.random.default_rng(2)
    source, target = rng.normal(size=(300, d_in)), rng.normal(size=(300, d_out))
    W, _ = cf.orthogonal_procrustes(source, target)
    assert W.shape == (d_in, d_out)
    # Zero-pad both sides to max(d_in, d_out), solve the square problem, slice: the documented definition.
    D = max(d_in, d_out)
    padded = lambda x: np.pad(x, ((0, 0), (0, D - x.shape[1])))
    R, _ = scipy.linalg.orthogonal_procrustes(padded(source), padded(target))
    np.testing.assert_allclose(W, R[:d_in, :d_out], atol=1e-5)
    gram = W @ W.T if d_in <= d_out else W.T @ W  # orthonormal rows (embedding) or columns (projection)
    np.testing.assert_allclose(gram, np.eye(min(d_in, d_out)), atol=1e-5)


def test_procrustes_recovers_an_isometric_embedding_into_more_dims():
    rng = np.random.default_rng(3)
    source = rng.normal(size=(100, 6))
    Q = random_orthogonal(10, 4)[:6]  # [6, 10] with orthonormal rows
    W, _ = cf.orthogonal_procrustes(source, source @ Q)
    np.testing.assert_allclose(W, Q, atol=1e-5)


@pytest.mark.parametrize("d_in,d_out", [(12, 12), (12, 20), (20, 12)])
@pytest.mark.parametrize("towards", ["zero", "identity"])
def test_ridge_recovers_an_affine_map(d_in, d_out, towards):
    rng = np.random.default_rng(5)
    source = rng.normal(size=(500, d_in))
    A, c = rng.normal(size=(d_in, d_out)), rng.normal(size=d_out)
    target = source @ A + c
    W, b = cf.ridge(source, target, 0.0, towards=towards)
    np.testing.assert_allclose(W, A, atol=1e-4)
    np.testing.assert_allclose(b, c, atol=1e-4)
    W, b = cf.ridge(source, target, 1e-6, towards=towards)  # a tiny penalty changes nothing visible
    np.testing.assert_allclose(W, A, atol=1e-4)


@pytest.mark.parametrize("d_in,d_out", [(12, 12), (12, 20), (20, 12)])
def test_ridge_towards_identity_with_huge_alpha_is_the_identity(d_in, d_out):
    rng = np.random.default_rng(6)
    source, target = rng.normal(size=(100, d_in)), rng.normal(size=(100, d_out)) + 2.0
    E = np.eye(d_in, d_out)
    W, b = cf.ridge(source, target, 1e9, towards="identity", fit_intercept=False)
    np.testing.assert_allclose(W, E, atol=1e-6)
    np.testing.assert_allclose(b, 0, atol=1e-6)
    # With the (unpenalised) intercept, alpha -> inf is exactly QDC's mean shift.
    W, b = cf.ridge(source, target, np.inf, towards="identity")
    W_shift, b_shift = cf.mean_shift(source, target)
    np.testing.assert_array_equal(W, E.astype(np.float32))
    np.testing.assert_allclose(b, b_shift, atol=1e-6)
    np.testing.assert_array_equal(W_shift, W)
    # Towards zero, a huge alpha kills W instead.
    W, _ = cf.ridge(source, target, 1e9, towards="zero")
    np.testing.assert_allclose(W, 0, atol=1e-5)
    # E is base_projection: truncation or zero-padding, as the heads start.
    from esep_jax.heads import base_projection
    np.testing.assert_allclose(cf.apply_map(source, cf.identity_map(d_in, d_out)),
                               np.asarray(base_projection(source.astype(np.float32), d_out)), atol=1e-6)


def test_mean_shift_recovers_a_translation():
    rng = np.random.default_rng(7)
    source = rng.normal(size=(50, 8))
    shift = rng.normal(size=8)
    W, b = cf.mean_shift(source, source + shift)
    np.testing.assert_array_equal(W, np.eye(8))
    np.testing.assert_allclose(b, shift, atol=1e-6)


def test_ridge_path_matches_single_fits_and_bad_input_is_refused():
    rng = np.random.default_rng(8)
    source, target = rng.normal(size=(60, 5)), rng.normal(size=(60, 7))
    alphas = [0.0, 0.5, 10.0, np.inf]
    for alpha, (W, b) in zip(alphas, cf.ridge_path(source, target, alphas, towards="identity")):
        W1, b1 = cf.ridge(source, target, alpha, towards="identity")
        np.testing.assert_allclose(W, W1, atol=1e-6)
        # The normal equations hold for the penalised solution.
        if 0 < alpha < np.inf:
            S, T = source - source.mean(0), target - target.mean(0)
            np.testing.assert_allclose((S.T @ S + alpha * np.eye(5)) @ W,
                                       S.T @ T + alpha * np.eye(5, 7), atol=1e-4)
    with pytest.raises(ValueError, match="alpha"):
        cf.ridge(source, target, -1.0)
    with pytest.raises(ValueError, match="towards"):
        cf.ridge(source, target, 1.0, towards="one")
    with pytest.raises(ValueError, match="same n"):
        cf.orthogonal_procrustes(source, target[:10])


def test_supervised_targets_are_grade_weighted_means(synthetic_dataset):
    from esep_jax.data.dataset import Dataset

    dataset = Dataset(synthetic_dataset)
    qrels, corpus = dataset.qrels("train"), dataset.read_corpus()
    queries, targets = cf.supervised_targets(dataset, "train")
    assert queries.shape == (qrels.num_queries, dataset.query_dim) and targets.shape[1] == dataset.corpus_dim
    docs, grades = qrels.judgements(3)
    np.testing.assert_allclose(targets[3], grades @ corpus[docs] / grades.sum(), atol=1e-5)
    np.testing.assert_allclose(queries[3], dataset.read_queries(qrels.query_rows[3:4])[0])
    # relevance_level 2 keeps only each query's grade-2 document.
    _, strict = cf.supervised_targets(dataset, "train", relevance_level=2)
    np.testing.assert_allclose(strict[3], corpus[docs[grades == 2][0]], atol=1e-5)
    # Another query table (same row order) replaces the dataset's queries.
    other = np.arange(len(dataset.ids("queries")) * 3, dtype=np.float32).reshape(-1, 3)
    swapped, _ = cf.supervised_targets(dataset, "train", queries=other)
    np.testing.assert_array_equal(swapped[3], other[qrels.query_rows[3]])


def test_ridge_to_positive_documents_beats_the_identity(synthetic_dataset):
    from esep_jax.data.dataset import Dataset
    from esep_jax.evaluation.evaluator import SplitEvaluator
    from esep_jax.evaluation.retrieval import ExactIndex

    dataset = Dataset(synthetic_dataset)
    index = ExactIndex(dataset.read_corpus())
    dev = SplitEvaluator(dataset, dataset.qrels("dev"), index, top_k=100)
    test = SplitEvaluator(dataset, dataset.qrels("test"), index, top_k=100)
    source, target = cf.supervised_targets(dataset, "train")
    alpha, fitted, scores = cf.choose_alpha(source, target, dev)
    assert scores[alpha] == max(scores.values()) and np.inf in scores
    base_dev, base_test = dev.rank().metrics["ndcg@10"], test.rank().metrics["ndcg@10"]
    mapped = lambda q: cf.apply_map(q, fitted)
    assert scores[alpha] == pytest.approx(dev.rank(mapped).metrics["ndcg@10"])
    assert scores[alpha] > base_dev + 0.05, (base_dev, scores)
    assert test.rank(mapped).metrics["ndcg@10"] > base_test + 0.03
    # Procrustes to the positives is a (weaker) alternative that must not break retrieval either.
    assert test.rank(lambda q: cf.apply_map(q, cf.orthogonal_procrustes(source, target))).metrics["ndcg@10"] > 0.5


def test_drift_report_on_a_rotated_encoder(synthetic_dataset, tmp_path, capsys):
    """Encoder B = A followed by a rotation (queries and documents alike): B native equals A native, the
    unmapped B queries fail on A's index, and the fitted maps bring them back (retention ~ 1)."""
    from esep_jax.cli import main
    from esep_jax.data.dataset import Dataset
    from esep_jax.evaluation.drift import drift_report, fit_drift_maps, markdown_table

    dataset_A = Dataset(synthetic_dataset)
    R = random_orthogonal(dataset_A.query_dim, 9)
    queries_A = dataset_A.read_queries(np.arange(len(dataset_A.ids("queries"))))
    np.save(tmp_path / "queries_A.npy", queries_A)
    np.save(tmp_path / "queries_B.npy", (queries_A @ R).astype(np.float32))
    np.save(tmp_path / "corpus_A.npy", dataset_A.read_corpus())
    np.save(tmp_path / "corpus_B.npy", (dataset_A.read_corpus() @ R).astype(np.float32))
    for name, ids in (("corpus_ids.txt", dataset_A.ids("corpus")), ("query_ids.txt", dataset_A.ids("queries"))):
        (tmp_path / name).write_text("\n".join(ids) + "\n")
    qrels = []
    for split in ("train", "dev", "test"):
        split_qrels = dataset_A.qrels(split)
        lines = [f"{dataset_A.ids('queries')[split_qrels.query_rows[i]]}\t{dataset_A.ids('corpus')[d]}\t{g}"
                 for i in range(split_qrels.num_queries) for d, g in zip(*split_qrels.judgements(i))]
        (tmp_path / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        qrels += ["--qrels", f"{split}={tmp_path / f'{split}.tsv'}"]
    ingest = ["ingest", "--corpus", str(tmp_path / "corpus_A.npy"), "--corpus-ids", str(tmp_path / "corpus_ids.txt"),
              "--queries", str(tmp_path / "queries_B.npy"), "--query-ids", str(tmp_path / "query_ids.txt"), *qrels]
    assert main([*ingest, "--query-targets", str(tmp_path / "queries_A.npy"), "--out", str(tmp_path / "drift")]) == 0
    dataset = Dataset(str(tmp_path / "drift"))
    maps = fit_drift_maps(dataset)
    assert {"identity (B on A, no map)", "paired mean shift", "paired Procrustes",
            "paired ridge (E prior)", "supervised ridge (E prior)"} <= set(maps)
    rows = {r["system"]: r for r in drift_report(dataset, "test", maps, corpus_b=np.load(tmp_path / "corpus_B.npy"))}
    assert rows["B native"]["ndcg@10"] == pytest.approx(rows["A native"]["ndcg@10"], abs=1e-3)
    assert rows["identity (B on A, no map)"]["retention"] < 0.6
    assert rows["paired Procrustes"]["retention"] == pytest.approx(1.0, abs=1e-3)
    assert rows["paired ridge (E prior)"]["retention"] > 0.98
    assert "| paired Procrustes |" in markdown_table(list(rows.values()))
    # Without query targets: no A native and no paired maps; without B's corpus: no retention.
    assert main([*ingest, "--out", str(tmp_path / "bare")]) == 0
    capsys.readouterr()
    assert main(["drift", "--data", str(tmp_path / "bare"), "--json", str(tmp_path / "rows.json")]) == 0
    systems = [r["system"] for r in json.loads((tmp_path / "rows.json").read_text())]
    assert "A native" not in systems and not any(s.startswith("paired") for s in systems)
    assert "supervised ridge (E prior)" in systems and "| system |" in capsys.readouterr().out
    np.save(tmp_path / "short.npy", np.zeros((3, dataset.query_dim), np.float32))
    assert main(["drift", "--data", str(tmp_path / "drift"), "--corpus-b", str(tmp_path / "short.npy")]) == 2
    assert main(["drift", "--data", str(tmp_path / "drift"), "--corpus-b", str(tmp_path / "missing.npy")]) == 2
    assert "missing.npy" in capsys.readouterr().err
