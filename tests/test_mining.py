"""Hard-negative mining equals a numpy brute-force ranking with judged positives and the skip guard removed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ingest_args, write_synthetic_sources
from esep_jax.cli import main
from esep_jax.data.candidates import read_candidates
from esep_jax.data.dataset import Dataset
from esep_jax.errors import InputError
from esep_jax.evaluation.mining import mine_negatives, select_negatives

NUM_DOCS = 60


@pytest.fixture(scope="module")
def mining_data(tmp_path_factory) -> dict:
    """A synthetic dataset where some train queries are also judged in dev: a top-ranked document relevant
    there (must be excluded from train negatives) and one judged non-relevant there (must not be)."""
    root = tmp_path_factory.mktemp("mining")
    sources = write_synthetic_sources(root / "src", num_docs=NUM_DOCS, num_queries=30, dim=8)
    corpus, queries = np.load(sources["corpus"]), np.load(sources["queries"])
    train_lines = Path(sources["qrels"]["train"]).read_text().splitlines()[1:]
    train_positives = {tuple(line.split("\t")[:2]) for line in train_lines}
    extra, relevant_elsewhere, non_relevant_elsewhere = [], {}, {}
    for q in range(5):  # train queries 0..4
        ranked = [d for d in np.argsort(-(queries[q] @ corpus.T)) if (f"q{q}", f"d{d}") not in train_positives]
        relevant_elsewhere[q], non_relevant_elsewhere[q] = int(ranked[0]), int(ranked[1])
        extra += [f"q{q}\td{ranked[0]}\t1", f"q{q}\td{ranked[1]}\t0"]
    with open(sources["qrels"]["dev"], "a") as handle:
        handle.write("\n".join(extra) + "\n")
    assert main(ingest_args(sources, root / "dataset")) == 0
    return {"path": str(root / "dataset"), "relevant_elsewhere": relevant_elsewhere,
            "non_relevant_elsewhere": non_relevant_elsewhere}


def _judged_pairs(dataset: Dataset) -> set[tuple[int, int]]:
    pairs = set()
    for split in dataset.splits:
        qrels = dataset.qrels(split)
        for i in range(qrels.num_queries):
            docs, grades = qrels.judgements(i)
            pairs |= {(int(qrels.query_rows[i]), int(d)) for d in docs[grades >= 1]}
    return pairs


def _brute_force(dataset: Dataset, split: str, k: int, skip: int, exclude: bool = True, vectors=None):
    qrels = dataset.qrels(split)
    vectors = dataset.read_queries(qrels.query_rows) if vectors is None else vectors
    scores = vectors @ dataset.read_corpus().T
    judged = _judged_pairs(dataset) if exclude else set()
    rows = np.full((qrels.num_queries, k), -1, np.int32)
    values = np.zeros((qrels.num_queries, k), np.float32)
    for i, query in enumerate(qrels.query_rows):
        ranked = [d for d in np.argsort(-scores[i], kind="stable") if (int(query), int(d)) not in judged]
        chosen = ranked[skip:skip + k]
        rows[i, :len(chosen)] = chosen
        values[i, :len(chosen)] = scores[i, chosen]
    return rows, values


@pytest.mark.parametrize("skip", [0, 3])
def test_mined_lists_match_brute_force_and_hold_no_judged_positive(mining_data, skip):
    dataset = Dataset(mining_data["path"])
    mined = mine_negatives(dataset, "train", k=6, skip=skip, query_chunk=8)  # several query chunks
    expected_rows, expected_scores = _brute_force(dataset, "train", 6, skip)
    np.testing.assert_array_equal(mined.query_rows, dataset.qrels("train").query_rows)
    np.testing.assert_array_equal(mined.doc_rows, expected_rows)
    np.testing.assert_allclose(mined.scores, expected_scores, rtol=1e-5, atol=1e-5)
    judged = _judged_pairs(dataset)
    assert not any((int(q), int(d)) in judged for q, row in zip(mined.query_rows, mined.doc_rows) for d in row)
    assert (mined.doc_rows >= 0).all() and mined.info["short_lists"] == 0
    if skip == 0:  # judged relevant in dev only: still excluded; judged non-relevant: still a negative
        for q in range(5):
            assert mining_data["relevant_elsewhere"][q] not in mined.doc_rows[q]
            assert mining_data["non_relevant_elsewhere"][q] == mined.doc_rows[q, 0]


def test_skip_drops_exactly_the_first_s_non_positive_ranks(mining_data):
    dataset = Dataset(mining_data["path"])
    unguarded = mine_negatives(dataset, "train", k=9, skip=0)
    guarded = mine_negatives(dataset, "train", k=5, skip=4)
    np.testing.assert_array_equal(guarded.doc_rows, unguarded.doc_rows[:, 4:])
    np.testing.assert_array_equal(guarded.scores, unguarded.scores[:, 4:])
    assert (guarded.info["skip"], unguarded.info["skip"]) == (4, 0)


def test_lists_are_padded_when_the_corpus_runs_out(mining_data):
    dataset = Dataset(mining_data["path"])
    mined = mine_negatives(dataset, "train", k=NUM_DOCS + 5, skip=2)
    judged = _judged_pairs(dataset)
    for query, row, scores in zip(mined.query_rows, mined.doc_rows, mined.scores):
        available = NUM_DOCS - sum(1 for q, _ in judged if q == query) - 2
        assert (row[:available] >= 0).all() and (row[available:] == -1).all()
        assert (scores[available:] == 0).all() and len(set(row[:available])) == available
    assert mined.info["short_lists"] == mined.num_queries
    np.testing.assert_array_equal(mined.doc_rows, _brute_force(dataset, "train", NUM_DOCS + 5, 2)[0])


def test_keeping_judged_documents_gives_the_raw_ranking(mining_data):
    dataset = Dataset(mining_data["path"])
    mined = mine_negatives(dataset, "train", k=5, skip=1, exclude_judged=False)
    rows, _ = _brute_force(dataset, "train", 5, 1, exclude=False)
    np.testing.assert_array_equal(mined.doc_rows, rows)
    top, _ = _brute_force(dataset, "train", 6, 0, exclude=False)
    judged = _judged_pairs(dataset)
    fraction = np.mean([(int(q), int(d)) in judged for q, row in zip(mined.query_rows, top) for d in row])
    assert mined.info["judged_fraction_of_top"] == pytest.approx(fraction)
    assert fraction > 0.05  # the synthetic queries retrieve their positives: exclusion matters


def test_mining_through_a_trained_head(mining_data, tmp_path):
    from esep_jax.runs.trained_run import TrainedRun

    workdir = tmp_path / "run"
    # dev = train so a few steps already beat the base and the best head is not the identity.
    assert main(["train", "--data", mining_data["path"], "--workdir", str(workdir), "--no-progress",
                 "--config.train.num_steps=10", "--config.train.eval_every=5", "--config.train.batch_size=8",
                 "--config.optim.warmup_steps=1", "--config.optim.learning_rate=3e-2", "--config.optim.weight_decay=1e-4",
                 "--config.train.dev_split=train"]) == 0
    dataset = Dataset(mining_data["path"])
    run = TrainedRun.load(workdir)
    assert run.best_steps.max() > 0
    vectors = np.asarray(run.transform(dataset.read_queries(dataset.qrels("train").query_rows)))
    mined = mine_negatives(dataset, "train", k=6, skip=2, workdir=workdir)
    expected_rows, expected_scores = _brute_force(dataset, "train", 6, 2, vectors=vectors)
    np.testing.assert_array_equal(mined.doc_rows, expected_rows)
    np.testing.assert_allclose(mined.scores, expected_scores, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(mined.doc_rows, mine_negatives(dataset, "train", k=6, skip=2).doc_rows)
    assert mined.info["workdir"] == str(workdir.absolute())


def test_select_negatives_on_a_hand_made_ranking():
    rows = np.array([[5, 1, 7, 2, 9], [3, 4, 0, 8, 6]])
    scores = -np.arange(10, dtype=np.float32).reshape(2, 5)
    excluded = np.array([[False, True, False, True, False], [True, True, True, True, True]])
    got_rows, got_scores = select_negatives(rows, scores, excluded, k=3, skip=1)
    np.testing.assert_array_equal(got_rows, [[7, 9, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(got_scores, [[-2, -4, 0], [0, 0, 0]])


def test_bad_arguments_are_input_errors(mining_data):
    dataset = Dataset(mining_data["path"])
    with pytest.raises(InputError, match="--k"):
        mine_negatives(dataset, "train", k=0, skip=0)
    with pytest.raises(InputError, match="--skip"):
        mine_negatives(dataset, "train", k=3, skip=-1)
    with pytest.raises(InputError, match="no split 'nope'"):
        mine_negatives(dataset, "nope", k=3, skip=0)


def test_mine_cli_round_trip(mining_data, tmp_path, capsys):
    data = str(shutil.copytree(mining_data["path"], tmp_path / "dataset"))
    args = ["mine", "--data", data, "--split", "train", "--name", "hard", "--k", "5", "--skip", "2",
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "21 train queries x 5 negatives (skip 2" in out
    stored = read_candidates(Dataset(data), "hard")
    mined = mine_negatives(Dataset(data), "train", k=5, skip=2)
    np.testing.assert_array_equal(stored.doc_rows, mined.doc_rows)
    np.testing.assert_array_equal(stored.scores, mined.scores)
    assert {key: stored.info[key] for key in ("kind", "k", "queries", "skip", "split", "exclude_judged")} == \
        {"kind": "negatives", "k": 5, "queries": 21, "skip": 2, "split": "train", "exclude_judged": True}
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exist" in error and "--overwrite" in error
    assert main(args[:-2] + ["0", "--overwrite", "--no-progress"]) == 0  # --skip 0 replaces it
    assert read_candidates(Dataset(data), "hard").info["skip"] == 0
    assert main(["mine", "--data", data, "--name", "other", "--k", "0"]) == 2
    assert "--k: must be >= 1" in capsys.readouterr().err
