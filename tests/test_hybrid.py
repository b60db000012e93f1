"""Hybrid retrieval: RRF against hand-computed scores (both implementations), the bundle's BM25 index against
bm25s itself, what bm25s writes to disk, TREC run reading, and `esep-jax eval --fuse` against trec_eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from esep_jax.cli import main
from esep_jax.evaluation.fusion import read_trec_run, reciprocal_rank_fusion
from esep_jax.serving.hybrid import BM25Index, Fusion, reciprocal_rank_fusion as rrf_rows, write_bm25_index
from esep_jax.serving.errors import QueryError

# dense ranks a, b, c; BM25 ranks c, a, d. By hand, with k = 60:
#   a = 1/61 + 1/62, c = 1/63 + 1/61, b = 1/62, d = 1/63            -> a, c, b, d
# and with weights 1 (dense) : 2 (BM25):
#   a = 1/61 + 2/62 = .0486516, c = 1/63 + 2/61 = .0486598, d = 2/63, b = 1/62  -> c, a, d, b
# and with k = 0: a = 1 + 1/2, c = 1/3 + 1, b = 1/2, d = 1/3     -> a, c, b, d
DENSE, BM25 = ["a", "b", "c"], ["c", "a", "d"]
HAND = [
    ((1.0, 1.0), 60, [("a", 1 / 61 + 1 / 62), ("c", 1 / 63 + 1 / 61), ("b", 1 / 62), ("d", 1 / 63)]),
    ((1.0, 2.0), 60, [("c", 1 / 63 + 2 / 61), ("a", 1 / 61 + 2 / 62), ("d", 2 / 63), ("b", 1 / 62)]),
    ((1.0, 1.0), 0, [("a", 1.5), ("c", 1 / 3 + 1), ("b", 0.5), ("d", 1 / 3)]),
]


@pytest.mark.parametrize("weights, k, expected", HAND)
def test_rrf_equals_the_hand_computed_example(weights, k, expected):
    fused = reciprocal_rank_fusion([DENSE, BM25], weights, k)
    assert [doc for doc, _ in fused] == [doc for doc, _ in expected]
    np.testing.assert_allclose([s for _, s in fused], [s for _, s in expected], rtol=1e-12)
    # The serving implementation (corpus rows, -1 = no document) agrees: a=0, b=1, c=2, d=3.
    row = {"a": 0, "b": 1, "c": 2, "d": 3}
    rows, scores = rrf_rows([np.array([[0, 1, 2, -1]]), np.array([[2, 0, 3]])], list(weights), k, 4)
    assert rows[0].tolist() == [row[doc] for doc, _ in expected]
    np.testing.assert_allclose(scores[0], [s for _, s in expected], rtol=1e-6)


def test_rrf_ties_depth_and_short_lists():
    # x and y tie (1/61 + 1/62 each): the dense list's order decides.
    assert [d for d, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]])] == ["x", "y"]
    assert [d for d, _ in reciprocal_rank_fusion([["y", "x"], ["x", "y"]])] == ["y", "x"]
    # depth 1: only each list's first document counts.
    assert reciprocal_rank_fusion([DENSE, BM25], depth=1) == [("a", 1 / 61), ("c", 1 / 61)]
    rows, scores = rrf_rows([np.array([[5]]), np.array([[-1]])], [1.0, 1.0], 60, 3)
    assert rows.tolist() == [[5, -1, -1]] and np.isneginf(scores[0, 1:]).all()  # never padding passed off as a doc
    with pytest.raises(QueryError, match="hybrid.depth must be a positive integer"):
        Fusion(depth=0).check()
    with pytest.raises(QueryError, match="cannot both be 0"):
        Fusion(dense_weight=0, bm25_weight=0).check()


TEXTS = ["The quick brown fox jumps over the lazy dog", "Return the number of items in a sequence",
         "Foxes are quick and brown; dogs are lazy.", "", "sequence length: count the items",
         "abc abstract methods decorator", "A decorator indicating abstract methods", "numbers numbering numbered"]


def test_bm25_index_scores_like_bm25s_and_stores_no_pickle(tmp_path):
    import bm25s
    import Stemmer

    entry = write_bm25_index(tmp_path, TEXTS)
    directory = tmp_path / "bm25"
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy", "params.index.json",
                     "tokenizer.json", "vocab.index.json"]
    for path in directory.glob("*.npy"):
        assert np.load(path, allow_pickle=False).dtype != object  # plain arrays, never pickled objects
    index = BM25Index.load(tmp_path, entry, len(TEXTS))
    reference = bm25s.BM25.load(str(directory))  # bm25s reads the stored index as its own
    queries = ["quick fox", "number of items", "lazy dogs sequence", "abstract decorator", "zzz unknown", "the a",
               "fox fox"]
    # Our tokenizer is bm25s's own rules: lower-case, \b\w\w+\b, English stopwords, PyStemmer's English stemmer.
    expected_tokens = bm25s.tokenize(queries, stopwords="en", stemmer=Stemmer.Stemmer("english"),
                                     return_ids=False, show_progress=False)
    assert index.tokenize(queries) == expected_tokens
    rows, scores = index.search_rows(queries, 5)
    for q, tokens in enumerate(expected_tokens):
        known = [t for t in tokens if reference.vocab_dict.get(t, 10 ** 9) < len(index.indptr) - 1]
        truth = reference.get_scores(known) if known else np.zeros(len(TEXTS))
        np.testing.assert_allclose(index.scores(tokens), truth, rtol=1e-5, atol=1e-6)
        matched = np.flatnonzero(truth > 0)
        best = matched[np.lexsort((matched, -truth[matched]))][:5]
        assert rows[q, :len(best)].tolist() == best.tolist() and (rows[q, len(best):] == -1).all()
    assert (rows[4] == -1).all() and (rows[5] == -1).all()  # no known term: no BM25 results at all


def test_trec_runs_are_read_as_trec_eval_ranks_them_and_bad_lines_are_named(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d1 1 0.5 x\nq1 Q0 d2 2 0.9 x\nq1 Q0 d3 3 0.9 x\n\nq2 Q0 d1 1 1 x\n")
    # Score descending, ties by docid descending; the rank column is ignored (as trec_eval does).
    assert read_trec_run(str(run)) == {"q1": [("d3", 0.9), ("d2", 0.9), ("d1", 0.5)], "q2": [("d1", 1.0)]}
    from esep_jax.errors import InputError

    for text, message in (("q1 Q0 d1 1 0.5\n", "line 1: expected 6 fields"),
                          ("q1 Q0 d1 1 0.5 x\nq1 Q0 d1 2 0.4 x\n", "line 2: document 'd1' is ranked twice"),
                          ("q1 Q0 d1 1 nan x\n", "line 1: score 'nan' is not a finite number"),
                          ("", "no ranked documents")):
        run.write_text(text)
        with pytest.raises(InputError, match=message):
            read_trec_run(str(run))
    run.write_text("q1 Q0 d1 1 0.5 x\nq1 Q0 zz 2 0.4 x\n")
    with pytest.raises(InputError, match="run.trec: line 2: document 'zz' is not in the dataset's corpus"):
        read_trec_run(str(run), known_docs={"d1"})


def _qrels(path: Path) -> dict:
    qrels: dict = {}
    for line in path.read_text().splitlines()[1:]:
        qid, doc, grade = line.split("\t")
        qrels.setdefault(qid, {})[doc] = int(grade)
    return qrels


def test_eval_fuse_reports_the_fused_run_as_trec_eval_scores_it(synthetic_dataset, tmp_path, capsys):
    import pytrec_eval

    qrels = _qrels(Path(synthetic_dataset).parent / "sources" / "test.tsv")
    # Another "system": the judged documents of every other query, then a fixed tail (a partly good run).
    lines = []
    for n, qid in enumerate(sorted(qrels)):
        docs = (sorted(qrels[qid]) if n % 2 == 0 else []) + [f"d{i}" for i in range(n % 7, 400, 37)]
        docs = list(dict.fromkeys(docs))
        lines += [f"{qid} Q0 {doc} {rank} {1.0 / rank:.9g} other" for rank, doc in enumerate(docs, start=1)]
    other = tmp_path / "other.trec"
    other.write_text("\n".join(lines) + "\n")
    base_run = tmp_path / "base.trec"
    assert main(["eval", "--data", synthetic_dataset, "--split", "test", "--run", str(base_run)]) == 0
    plain = capsys.readouterr().out
    assert main(["eval", "--data", synthetic_dataset, "--split", "test", "--fuse", str(other), "--fuse-weight", "0.5",
                 "--fuse-k", "10", "--fuse-depth", "50", "--json", str(tmp_path / "m.json")]) == 0
    fused_out = capsys.readouterr().out
    assert fused_out.startswith(plain.rstrip("\n") + "\n")  # the existing table is unchanged, the section added
    assert "fused: base + " in fused_out and "by RRF (k=10, weights 1 : 0.5, top 50 of each" in fused_out
    fusion = json.loads((tmp_path / "m.json").read_text())["fusion"]

    # The same fusion written plainly, scored by trec_eval (pytrec_eval).
    def ranked(path):
        runs = {}
        for line in path.read_text().splitlines():
            qid, _, doc, _, score, _ = line.split()
            runs.setdefault(qid, []).append((doc, float(score)))
        return {q: [d for d, _ in sorted(v, key=lambda x: -x[1])] for q, v in runs.items()}

    mine, theirs = ranked(base_run), ranked(other)
    fused = {}
    for qid in qrels:
        scores = {}
        for weight, ranking in ((1.0, mine.get(qid, [])[:50]), (0.5, theirs.get(qid, [])[:50])):
            for rank, doc in enumerate(ranking, start=1):
                scores[doc] = scores.get(doc, 0.0) + weight / (10 + rank)
        fused[qid] = scores
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    per_query = evaluator.evaluate(fused)
    assert fusion["fused"]["ndcg@10"] == pytest.approx(np.mean([m["ndcg_cut_10"] for m in per_query.values()]),
                                                       abs=1e-6)
    assert fusion["fused"]["recall@100"] == pytest.approx(np.mean([m["recall_100"] for m in per_query.values()]),
                                                          abs=1e-6)
    alone = evaluator.evaluate({q: {d: 1.0 / r for r, d in enumerate(v, start=1)} for q, v in theirs.items()})
    assert fusion["run_alone"]["ndcg@10"] == pytest.approx(np.mean([alone.get(q, {}).get("ndcg_cut_10", 0.0)
                                                                    for q in qrels]), abs=1e-6)


def test_eval_fuse_errors_are_one_line(synthetic_dataset, tmp_path, capsys):
    bad = tmp_path / "bad.trec"
    bad.write_text("q255 Q0 d1 1 0.5 x\nq255 Q0 d2 2\n")
    capsys.readouterr()
    assert main(["eval", "--data", synthetic_dataset, "--split", "test", "--fuse", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("bad.trec: line 2: expected 6 fields `qid Q0 docid rank score tag`, got 4")
    assert len(err.splitlines()) == 1
    assert main(["eval", "--data", synthetic_dataset, "--split", "test", "--fuse", str(bad), "--fuse-k", "-1"]) == 2
    assert "--fuse-k: must be a finite number >= 0" in capsys.readouterr().err
