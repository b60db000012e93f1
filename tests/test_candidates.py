"""Candidate lists: lookup, the on-disk round trip, all-or-nothing writes, and teacher TSV import."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ingest_args, write_synthetic_sources
from esep_jax.cli import main
from esep_jax.data import candidates as candidates_module
from esep_jax.data.candidates import (Candidates, candidate_names, read_candidates, read_teacher_tsv,
                                      write_candidates)
from esep_jax.data.dataset import Dataset
from esep_jax.errors import InputError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("candidates")
    sources = write_synthetic_sources(root / "src", num_docs=60, num_queries=30, dim=8)
    assert main(ingest_args(sources, root / "dataset")) == 0
    return root / "dataset"


@pytest.fixture
def dataset_dir(pristine, tmp_path) -> Path:
    """A private copy: these tests write into the dataset."""
    return Path(shutil.copytree(pristine, tmp_path / "dataset"))


def _example(seed=0, queries=(3, 7, 1), k=4) -> Candidates:
    rng = np.random.default_rng(seed)
    doc_rows = rng.integers(0, 60, size=(len(queries), k)).astype(np.int32)
    doc_rows[0, -1] = -1
    scores = rng.normal(size=(len(queries), k)).astype(np.float32)
    scores[0, -1] = 0.0
    return Candidates(np.array(queries), doc_rows, scores, {"kind": "negatives", "split": "train"})


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory` (folders too) and each file's bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def test_lookup_returns_lists_in_the_asked_order_and_padding_for_unknown_queries():
    example = _example()
    doc_rows, scores = example.lookup(np.array([1, 5, 3, 1, 7, 100]))
    assert doc_rows.dtype == np.int32 and scores.dtype == np.float32 and doc_rows.shape == (6, 4)
    for out, query in enumerate([1, 5, 3, 1, 7, 100]):
        if query in (1, 3, 7):
            i = list(example.query_rows).index(query)
            np.testing.assert_array_equal(doc_rows[out], example.doc_rows[i])
            np.testing.assert_array_equal(scores[out], example.scores[i])
        else:
            assert (doc_rows[out] == -1).all() and (scores[out] == 0).all()
    empty = Candidates(np.zeros(0), np.zeros((0, 4)), np.zeros((0, 4)))
    assert (empty.lookup(np.array([0, 2]))[0] == -1).all()
    with pytest.raises(ValueError, match="duplicates"):
        Candidates(np.array([1, 1]), np.zeros((2, 3)), np.zeros((2, 3)))


def test_write_then_read_round_trips_with_provenance(dataset_dir):
    example = _example()
    entry = write_candidates(str(dataset_dir), "hard", example, {"skip": 10})
    dataset = Dataset(str(dataset_dir))
    assert candidate_names(dataset) == ["hard"] == candidate_names(str(dataset_dir))
    listed = dataset.manifest["candidates"]["hard"]
    assert listed == entry and listed["kind"] == "negatives" and listed["skip"] == 10
    assert (listed["k"], listed["queries"]) == (4, 3) and listed["created"]
    read = read_candidates(dataset, "hard")
    for name in ("query_rows", "doc_rows", "scores"):
        np.testing.assert_array_equal(getattr(read, name), getattr(example, name))
    assert read.info["write_id"] == entry["write_id"]
    assert sorted(os.listdir(dataset_dir / "candidates")) == ["hard"]  # nothing left behind


def test_overwrite_needs_the_flag_and_replaces_the_lists(dataset_dir):
    write_candidates(str(dataset_dir), "hard", _example(0))
    before = _snapshot(dataset_dir)
    with pytest.raises(InputError, match="already exist.*--overwrite"):
        write_candidates(str(dataset_dir), "hard", _example(1))
    assert _snapshot(dataset_dir) == before
    write_candidates(str(dataset_dir), "hard", _example(1, queries=(2,), k=6), overwrite=True)
    read = read_candidates(Dataset(str(dataset_dir)), "hard")
    assert read.doc_rows.shape == (1, 6)
    assert sorted(os.listdir(dataset_dir / "candidates")) == ["hard"]


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("failure", ["rename", "manifest"])
def test_a_failed_write_leaves_the_dataset_as_it_was(dataset_dir, monkeypatch, existing, failure):
    if existing:
        write_candidates(str(dataset_dir), "hard", _example(0))
    before = _snapshot(dataset_dir)
    final = dataset_dir / "candidates" / "hard"
    if failure == "rename":
        real_replace = os.replace

        def failing_replace(src, dst):
            if Path(dst) == final and ".tmp-" in Path(src).name:
                raise OSError(28, "No space left on device")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing_replace)
    else:
        def failing_manifest(path, text):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(candidates_module, "atomic_write_text", failing_manifest)
    with pytest.raises(OSError, match="No space"):
        write_candidates(str(dataset_dir), "hard", _example(1, k=5), overwrite=True)
    monkeypatch.undo()
    assert _snapshot(dataset_dir) == before  # same files, same bytes: no leftovers either
    dataset = Dataset(str(dataset_dir))
    if existing:
        np.testing.assert_array_equal(read_candidates(dataset, "hard").doc_rows, _example(0).doc_rows)
    else:
        assert candidate_names(dataset) == []


def test_arrays_from_an_interrupted_write_are_refused(dataset_dir):
    write_candidates(str(dataset_dir), "hard", _example(0))
    info = dataset_dir / "candidates" / "hard" / "info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "write_id": "other"}))
    with pytest.raises(InputError, match="write_id.*interrupted"):
        read_candidates(Dataset(str(dataset_dir)), "hard")


def test_reading_a_missing_name_or_array_names_what_is_missing(dataset_dir):
    with pytest.raises(InputError, match=r"dataset.json: candidates: no candidates named 'nope' in the dataset \(available: none"):
        read_candidates(Dataset(str(dataset_dir)), "nope")
    write_candidates(str(dataset_dir), "hard", _example(0))
    with pytest.raises(InputError, match=r"available: hard"):
        read_candidates(Dataset(str(dataset_dir)), "nope")
    shutil.rmtree(dataset_dir / "candidates" / "hard" / "scores")
    with pytest.raises(InputError, match=r"candidates/hard/scores"):
        read_candidates(Dataset(str(dataset_dir)), "hard")


def test_bad_names_rows_and_cloud_locations_are_refused(dataset_dir):
    for name in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(InputError, match="invalid candidates name"):
            write_candidates(str(dataset_dir), name, _example())
    bad = Candidates(np.array([0]), np.array([[60]]), np.array([[1.0]]), {"kind": "teacher"})
    with pytest.raises(InputError, match=r"candidates/bad/doc_rows: row 0: corpus row 60 outside \[-1, 60\)"):
        write_candidates(str(dataset_dir), "bad", bad)
    with pytest.raises(InputError, match="needs a local dataset"):
        write_candidates("gs://bucket/dataset", "hard", _example())
    assert not (dataset_dir / "candidates").exists()


def test_teacher_tsv_is_sorted_by_score_and_padded(dataset_dir, tmp_path):
    tsv = tmp_path / "teacher.tsv"
    tsv.write_text("query-id\tcorpus-id\tscore\nq2\td5\t0.5\nq2\td9\t3.25\nq0\td1\t-1\n\nq2\td3\t1e-3\n")
    teacher = read_teacher_tsv(str(tsv), Dataset(str(dataset_dir)))
    np.testing.assert_array_equal(teacher.query_rows, [0, 2])
    np.testing.assert_array_equal(teacher.doc_rows, [[1, -1, -1], [9, 5, 3]])
    np.testing.assert_allclose(teacher.scores, [[-1, 0, 0], [3.25, 0.5, 1e-3]])
    assert teacher.info["kind"] == "teacher"


@pytest.mark.parametrize("lines, line, field, message", [
    (["q1\td1"], 1, None, "expected 3 columns"),
    (["q1\td1\t1", "q1\td2\t1\textra"], 2, None, "expected 3 columns"),
    (["q1\td1\t1", "qX\td2\t1"], 2, "query-id", "unknown query id 'qX'"),
    (["q1\td1\t1", "q1\tdX\t1"], 2, "corpus-id", "unknown corpus id 'dX'"),
    (["q1\td1\thigh"], 1, "score", "not a number"),
    (["query-id\tcorpus-id\tscore", "q1\td1\tnan"], 2, "score", "not finite"),
    (["q1\td1\t1e39"], 1, "score", "not finite"),
    (["q1\td1\t1", "q2\td1\t1", "q1\td1\t2", "q1\td1\t3"], 3, "corpus-id",
     r"duplicate pair \(q1, d1\) \(first on line 1"),
])
def test_teacher_tsv_errors_name_the_file_line_and_field(dataset_dir, tmp_path, lines, line, field, message):
    tsv = tmp_path / "teacher.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as error:
        read_teacher_tsv(str(tsv), Dataset(str(dataset_dir)))
    assert (error.value.file, error.value.line, error.value.field) == (str(tsv), line, field)
    assert f"{tsv}: line {line}: " in str(error.value)
    assert re.search(message, str(error.value))


def test_teacher_cli_round_trip_and_one_line_errors(dataset_dir, tmp_path, capsys):
    tsv = tmp_path / "teacher.tsv"
    tsv.write_text("q4\td7\t2.5\nq4\td8\t4\nq9\td7\t1\n")
    args = ["teacher", "--data", str(dataset_dir), "--scores", str(tsv), "--name", "teach"]
    assert main(args) == 0
    assert "teacher scores for 2 queries, 3 pairs, up to 2 per query" in capsys.readouterr().out
    teacher = read_candidates(Dataset(str(dataset_dir)), "teach")
    assert teacher.info["kind"] == "teacher" and teacher.info["source"] == str(tsv)
    doc_rows, scores = teacher.lookup(np.array([9, 4, 0]))
    np.testing.assert_array_equal(doc_rows, [[7, -1], [8, 7], [-1, -1]])
    np.testing.assert_allclose(scores, [[1, 0], [4, 2.5], [0, 0]])
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exist" in error
    assert main(args + ["--overwrite"]) == 0
    tsv.write_text("q4\td7\t2.5\nq4\td8\n")
    assert main(args + ["--overwrite"]) == 2
    assert f"{tsv}: line 2: expected 3 columns" in capsys.readouterr().err
