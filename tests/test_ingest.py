"""Ingest: what lands on disk, and how every kind of bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ingest_args, write_synthetic_sources
from esep_jax.cli import main
from esep_jax.data.dataset import Dataset


@pytest.fixture
def sources(tmp_path) -> dict:
    return write_synthetic_sources(tmp_path / "src", num_docs=50, num_queries=40, dim=8)


def test_ingest_roundtrip_preserves_embeddings_ids_and_qrels(sources, tmp_path):
    out = tmp_path / "ds"
    assert main(ingest_args(sources, out)) == 0
    dataset = Dataset(str(out))
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["format_version"] == 1 and manifest["normalized"] is True
    assert manifest["corpus"] == {**manifest["corpus"], "count": 50, "dim": 8, "dtype": "float32"}
    np.testing.assert_array_equal(dataset.read_corpus(), np.load(sources["corpus"]))
    rows = np.array([5, 0, 39, 5])
    np.testing.assert_array_equal(dataset.read_queries(rows), np.load(sources["queries"])[rows])
    assert dataset.ids("corpus")[7] == "d7" and dataset.ids("queries")[3] == "q3"
    # Every TSV row comes back, as (query id, doc id, grade).
    for split in ("train", "dev", "test"):
        expected = {tuple(line.split("\t")) for line in Path(sources["qrels"][split]).read_text().splitlines()[1:]}
        qrels = dataset.qrels(split)
        got = set()
        for i in range(qrels.num_queries):
            docs, grades = qrels.judgements(i)
            got |= {(f"q{qrels.query_rows[i]}", f"d{d}", str(g)) for d, g in zip(docs, grades)}
        assert got == expected


def test_ingest_float16_storage_and_trec_qrels(sources, tmp_path):
    trec = tmp_path / "trec.tsv"
    rows = Path(sources["qrels"]["train"]).read_text().splitlines()[1:]
    trec.write_text("\n".join(f"{q} 0 {d} {g}" for q, d, g in (r.split("\t") for r in rows)) + "\n")
    out = tmp_path / "ds16"
    args = ingest_args(sources, out, splits=()) + ["--qrels", f"train={trec}", "--dtype", "float16"]
    assert main(args) == 0
    dataset = Dataset(str(out))
    assert dataset.corpus_table().dtype.name == "float16"
    np.testing.assert_allclose(dataset.read_corpus(), np.load(sources["corpus"]), atol=1e-3)
    assert dataset.qrels("train").grades.shape[0] == len(rows)


def _expect_refused(capsys, tmp_path, args, *fragments):
    out = Path(args[args.index("--out") + 1])
    assert main(args) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("esep-jax: error: ")
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp leftovers


def test_rows_ids_mismatch(sources, tmp_path, capsys):
    np.save(sources["corpus"], np.load(sources["corpus"])[:-1])
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "corpus.npy", "49 rows but 50 ids")


def test_query_corpus_dim_mismatch(sources, tmp_path, capsys):
    queries = np.load(sources["queries"])
    np.save(sources["queries"], np.concatenate([queries, queries[:, :2]], axis=1))
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "queries.npy", "query dim 10 != corpus dim 8")


def test_different_dims_allowed_when_asked(sources, tmp_path):
    queries = np.load(sources["queries"])
    np.save(sources["queries"], queries[:, :6])
    assert main(ingest_args(sources, tmp_path / "out") + ["--allow-different-dims"]) == 0
    assert Dataset(str(tmp_path / "out")).query_dim == 6


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_row(sources, tmp_path, capsys, bad):
    corpus = np.load(sources["corpus"])
    corpus[17, 3] = bad
    np.save(sources["corpus"], corpus)
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "corpus.npy", "row 17", "'d17'")


def test_wrong_dtype(sources, tmp_path, capsys):
    np.save(sources["queries"], (np.load(sources["queries"]) * 100).astype(np.int32))
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "queries.npy", "dtype int32")


def test_pickled_object_array_is_refused(sources, tmp_path, capsys):
    np.save(sources["corpus"], np.array([{"a": 1}] * 50, dtype=object), allow_pickle=True)
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "corpus.npy")


def test_duplicate_id(sources, tmp_path, capsys):
    ids = Path(sources["corpus_ids"]).read_text().splitlines()
    ids[9] = ids[2]
    Path(sources["corpus_ids"]).write_text("\n".join(ids) + "\n")
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "corpus_ids.txt", "line 10",
                    "duplicate id 'd2' (first on line 3)")


def test_empty_id_line(sources, tmp_path, capsys):
    ids = Path(sources["query_ids"]).read_text().splitlines()
    ids[4] = "  "
    Path(sources["query_ids"]).write_text("\n".join(ids) + "\n")
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "query_ids.txt", "line 5", "empty id")


@pytest.mark.parametrize("row, fragments", [
    ("q1\tnope\t1", ("line 3", "corpus-id", "unknown corpus id 'nope'")),
    ("zz\td1\t1", ("line 3", "query-id", "unknown query id 'zz'")),
    ("q1\td1\thigh", ("line 3", "score", "'high' is not an integer")),
    ("q1\td1", ("line 3", "expected 3 columns")),
])
def test_bad_qrels_row(sources, tmp_path, capsys, row, fragments):
    path = Path(sources["qrels"]["dev"])
    lines = path.read_text().splitlines()
    lines.insert(2, row)
    path.write_text("\n".join(lines) + "\n")
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "dev.tsv", *fragments)


def test_duplicate_judgement(sources, tmp_path, capsys):
    path = Path(sources["qrels"]["test"])
    lines = path.read_text().splitlines()
    lines.append(lines[1])
    path.write_text("\n".join(lines) + "\n")
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "test.tsv",
                    f"line {len(lines)}", "duplicate judgement", "first on line 2")


@pytest.mark.parametrize("content", ["query-id\tcorpus-id\tscore\n", "", "query-id\tcorpus-id\tscore\nq1\td1\t0\n"])
def test_empty_split(sources, tmp_path, capsys, content):
    Path(sources["qrels"]["dev"]).write_text(content)
    _expect_refused(capsys, tmp_path, ingest_args(sources, tmp_path / "out"), "dev.tsv", "empty split")


def test_missing_file(sources, tmp_path, capsys):
    args = ingest_args(sources, tmp_path / "out")
    args[args.index("--queries") + 1] = str(tmp_path / "missing.npy")
    _expect_refused(capsys, tmp_path, args, "missing.npy")


def test_existing_output_is_kept_unless_overwrite(sources, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(ingest_args(sources, out)) == 0
    before = (out / "dataset.json").read_text()
    assert main(ingest_args(sources, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "dataset.json").read_text() == before
    np.save(sources["corpus"], np.full((50, 8), np.nan, np.float32))
    assert main(ingest_args(sources, out) + ["--overwrite"]) == 2  # a failed overwrite keeps the old dataset
    assert (out / "dataset.json").read_text() == before
