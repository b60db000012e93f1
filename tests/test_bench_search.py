"""`esep-jax bench search` and the index tools behind it: exact search, recall, tuning, synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from esep_jax.bench.search import synthetic_embeddings
from esep_jax.cli import main
from esep_jax.export import scann_index


def test_exact_top_k_matches_a_full_sort_across_chunks():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((1000, 8)).astype(np.float32)
    queries = rng.standard_normal((37, 8)).astype(np.float32)
    rows, scores = scann_index.exact_top_k(corpus, queries, 7, query_batch=10, corpus_chunk=96)
    full = queries @ corpus.T
    np.testing.assert_array_equal(rows, np.argsort(-full, axis=1)[:, :7])
    np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :7], rtol=1e-6)


def test_recall_counts_overlap_and_never_counts_missing_results():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert scann_index.recall_at_k(np.array([[4, 3, 9, -1], [5, 6, 7, 8]]), exact, 4) == pytest.approx(6 / 8)
    assert scann_index.recall_at_k(np.full((2, 4), -1), np.full((2, 4), -1), 4) == 0.0


def test_plans_follow_the_size_rules():
    assert scann_index.plan_index(19_999).strategy == "brute_force"
    assert scann_index.plan_index(50_000).strategy == "ah"
    plan = scann_index.plan_index(1_000_000)
    assert (plan.strategy, plan.num_leaves, plan.training_sample_size) == ("tree", 1000, 250_000)
    with pytest.raises(ValueError, match="unknown index strategy"):
        scann_index.plan_index(10, "hnsw")


def test_synthetic_data_is_clustered_not_uniform():
    corpus, queries = synthetic_embeddings(5000, 50, 384)
    assert corpus.shape == (5000, 384) and corpus.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(corpus, axis=1), 1.0, rtol=1e-5)
    rng = np.random.default_rng(0)
    uniform = rng.standard_normal((5000, 384)).astype(np.float32)
    uniform /= np.linalg.norm(uniform, axis=1, keepdims=True)
    tenth = {name: np.sort(queries @ docs.T, axis=1)[:, -10].mean()
             for name, docs in (("clustered", corpus), ("uniform", uniform))}
    # On the sphere every point is about equally far from every other; clusters give clearly closer neighbours.
    assert tenth["clustered"] > tenth["uniform"] + 0.08, tenth


@pytest.mark.parametrize("index", ["ah", "tree"])
def test_tuning_reaches_the_target_on_held_out_queries(index):
    corpus, queries = synthetic_embeddings(4000, 200, 32, seed=1)
    plan = scann_index.plan_index(len(corpus), index)
    searcher = scann_index.build_searcher(corpus, plan)
    tune_q, verify_q = scann_index.split_tune_verify(queries)
    truth = [scann_index.exact_top_k(corpus, q, 10)[0] for q in (tune_q, verify_q)]
    tuned = scann_index.tune(searcher, plan, (tune_q, truth[0]), (verify_q, truth[1]), target=0.9)
    assert tuned["reached_target"] and tuned["recall@10"] >= 0.9 and tuned["qps"] > 0
    rows, _ = scann_index.search(searcher, verify_q, 10, tuned["leaves_to_search"], tuned["reorder"])
    assert scann_index.recall_at_k(rows, truth[1]) == pytest.approx(tuned["recall@10"])
    if index == "tree":
        assert 1 <= tuned["leaves_to_search"] <= plan.num_leaves


def test_bench_search_cli_writes_the_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "search", "--corpus-size", "3000", "--dim", "16", "--queries", "60", "--index", "ah",
                 "--json", str(out), "--markdown", str(tmp_path / "bench.md")]) == 0
    record = json.loads(out.read_text())
    assert {"recall@10", "qps", "brute_force_qps", "build_s", "leaves_to_search", "reorder"} <= set(record)
    assert record["corpus_size"] == 3000 and record["strategy"] == "ah" and record["recall@10"] >= 0.95
    assert record["qps"] > 0 and record["brute_force_qps"] > 0
    assert "| synthetic | 3,000 | 16 | ah |" in (tmp_path / "bench.md").read_text()
    assert "recall@10" in capsys.readouterr().out


def test_bench_search_on_a_dataset(synthetic_dataset, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "search", "--data", synthetic_dataset, "--queries", "50", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert (record["data"], record["corpus_size"], record["dim"], record["queries"]) == (synthetic_dataset, 400, 16, 50)
    assert record["strategy"] == "brute_force" and record["recall@10"] == 1.0
