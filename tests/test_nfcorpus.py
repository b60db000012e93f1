"""Real data: NFCorpus with all-MiniLM-L6-v2 reproduces the published figure, and training does not hurt it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import pytrec_eval

from conftest import SHARED_DATA
from esep_jax.cli import main
from esep_jax.config import Config
from esep_jax.data.dataset import Dataset
from esep_jax.evaluation.evaluator import SplitEvaluator
from esep_jax.evaluation.retrieval import ExactIndex
from esep_jax.heads import build_head, init_params

PUBLISHED_NDCG10 = 0.3159  # MTEB, all-MiniLM-L6-v2 on NFCorpus test


def _read_trec_run(path):
    run = {}
    for line in open(path):
        qid, _, docid, _, score, _ = line.split()
        run.setdefault(qid, {})[docid] = float(score)
    return run


def _read_qrels(path):
    qrels = {}
    for line in list(open(path))[1:]:
        qid, docid, grade = line.split()
        qrels.setdefault(qid, {})[docid] = int(grade)
    return qrels


def test_base_reproduces_published_ndcg_and_trec_eval(nfcorpus_dataset, tmp_path):
    assert main(["eval", "--data", nfcorpus_dataset, "--split", "test", "--json", str(tmp_path / "m.json"),
                 "--run", str(tmp_path / "base.run")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["ndcg@10"] == pytest.approx(PUBLISHED_NDCG10, abs=0.003)
    # The written run, read back by trec_eval (pytrec_eval), gives our numbers to 1e-6.
    run = _read_trec_run(tmp_path / "base.run")
    qrels = _read_qrels(SHARED_DATA / "nfcorpus" / "qrels" / "test.tsv")
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_100", "map_cut_100"}).evaluate(run)
    for ours, theirs in (("ndcg@10", "ndcg_cut_10"), ("recall@100", "recall_100"), ("map@100", "map_cut_100")):
        assert result[ours] == pytest.approx(np.mean([v[theirs] for v in per_query.values()]), abs=1e-6)


def test_untrained_head_reproduces_base_retrieval_exactly(nfcorpus_dataset):
    dataset = Dataset(nfcorpus_dataset)
    evaluator = SplitEvaluator(dataset, dataset.qrels("dev"), ExactIndex(dataset.read_corpus()))
    head = build_head(Config().model, dataset.corpus_dim)
    params = init_params(head, jax.random.key(0), dataset.query_dim)
    base, through_head = evaluator.rank(), evaluator.rank(lambda q: head.apply({"params": params}, q))
    np.testing.assert_array_equal(base.doc_rows, through_head.doc_rows)
    assert base.metrics == through_head.metrics


def test_default_training_does_not_fall_below_base(nfcorpus_dataset, tmp_path):
    workdir = str(tmp_path / "run")
    assert main(["train", "--data", nfcorpus_dataset, "--workdir", workdir, "--no-progress"]) == 0
    assert main(["eval", "--data", nfcorpus_dataset, "--split", "test", "--workdir", workdir,
                 "--json", str(tmp_path / "t.json")]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["base"]["ndcg@10"] == pytest.approx(PUBLISHED_NDCG10, abs=0.003)
    assert result["ndcg@10"] >= result["base"]["ndcg@10"]
