"""Serving a bundle: JAX-free loading, query checks, padded ScaNN tails, and `esep-jax search` output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK_HEAVY_IMPORTS

from esep_jax.cli import main
from esep_jax.export import scann_index
from esep_jax.serving import BundleError, ChecksumError, QueryError, Searcher

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--config.train.num_steps=10", "--config.train.eval_every=10", "--config.train.batch_size=32",
         "--config.optim.learning_rate=1e-2", "--config.optim.weight_decay=1e-4", "--config.optim.warmup_steps=2", "--no-progress"]


@pytest.fixture(scope="module")
def bundles(synthetic_dataset, tmp_path_factory) -> dict[str, Path]:
    """Bundles of one short run: brute force (auto at 400 docs) and a forced tree index."""
    root = tmp_path_factory.mktemp("serving")
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(root / "run"), *TRAIN]) == 0
    out = {}
    for strategy in ("auto", "tree"):
        out[strategy] = root / f"bundle-{strategy}"
        assert main(["export", "--workdir", str(root / "run"), "--out", str(out[strategy]),
                     "--index", strategy]) == 0
    return out


@pytest.fixture(scope="module")
def queries(synthetic_dataset) -> np.ndarray:
    from esep_jax.data.dataset import Dataset

    return Dataset(synthetic_dataset).read_queries(np.arange(20))




def test_bundle_loads_and_searches_with_jax_flax_tensorstore_unimportable(bundles, queries, tmp_path):
    np.save(tmp_path / "q.npy", queries[:3])
    script = BLOCK_HEAVY_IMPORTS + f"""
import json
for name in ("jax", "flax", "tensorstore"):
    try:
        __import__(name)
        raise SystemExit(name + " imported despite the block")
    except ImportError:
        pass
import numpy as np
from esep_jax.serving import Searcher
from esep_jax.cli import main
searcher = Searcher.load({str(bundles['auto'])!r})
ids, scores = searcher.search(np.load({str(tmp_path / 'q.npy')!r}), 5)
assert main(["search", "--bundle", {str(bundles['auto'])!r}, "--queries", {str(tmp_path / 'q.npy')!r},
             "--k", "5", "--format", "tsv"]) == 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "tensorstore", "orbax"))
print(json.dumps({{"ids": ids.tolist(), "scores": scores.tolist(), "heavy": heavy}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["heavy"] == []
    ids, scores = Searcher.load(bundles["auto"]).search(queries[:3], 5)
    assert payload["ids"] == ids.tolist()
    np.testing.assert_allclose(payload["scores"], scores, rtol=1e-6)


def test_search_returns_the_exact_top_k_of_the_transformed_queries(bundles, queries, synthetic_dataset):
    from esep_jax.data.dataset import Dataset

    searcher = Searcher.load(bundles["auto"])
    assert searcher.manifest["index"]["strategy"] == "brute_force"
    dataset = Dataset(synthetic_dataset)
    rows, scores = scann_index.exact_top_k(dataset.read_corpus(), searcher.transform(queries), 10)
    ids, got_scores = searcher.search(queries, 10)
    assert ids.shape == (20, 10) and got_scores.dtype == np.float32
    assert ids.tolist() == [[dataset.ids("corpus")[r] for r in row] for row in rows]
    np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-6)
    one_ids, _ = searcher.search(queries[0], 3)  # a single vector is one query
    assert one_ids.tolist() == [ids[0, :3].tolist()]


@pytest.mark.parametrize("make, k, message", [
    (lambda q: q, 401, "k=401 exceeds the 400 documents"),
    (lambda q: q, 0, "k must be a positive integer"),
    (lambda q: np.where(np.arange(len(q))[:, None] == 2, np.nan, q), 5, "query row 2 holds NaN or Inf"),
    (lambda q: np.where(np.arange(len(q))[:, None] >= 1, np.inf, q), 5, "query row 1 (and 18 more) holds NaN"),
    (lambda q: q[:, :8], 5, "query dim 8 != the bundle's input dim 16"),
    (lambda q: q[None], 5, "must be [num_queries, 16], got shape [1, 20, 16]"),
    (lambda q: q.astype(str), 5, "must be numbers"),
])
def test_bad_queries_and_k_are_clear_value_errors(bundles, queries, make, k, message):
    searcher = Searcher.load(bundles["auto"])
    with pytest.raises(QueryError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")) as error:
        searcher.search(make(queries), k)
    assert isinstance(error.value, ValueError)


def test_padded_scann_tails_never_pass_for_documents(bundles, queries):
    searcher = Searcher.load(bundles["tree"])
    settings = searcher.manifest["index"]
    assert settings["strategy"] == "tree" and settings["num_leaves"] >= 4
    k = 150  # far more than one leaf of ~50 documents holds
    raw_rows, raw_scores = searcher.index.search_batched(searcher.transform(queries), k, k, 1)
    assert np.isnan(raw_scores).any()  # ScaNN itself pads: row 0 with a NaN score
    rows, scores = scann_index.search(searcher.index, searcher.transform(queries), k, leaves_to_search=1)
    missing = rows < 0
    assert missing.any() and np.isneginf(scores[missing]).all() and np.isfinite(scores[~missing]).all()
    assert (np.diff(missing.astype(int), axis=1) >= 0).all()  # missing slots only at the end of a row
    # The searcher retries short queries over every leaf, so a full row comes back ...
    rows, scores = searcher.search_rows(queries, k, leaves_to_search=1)
    assert (rows >= 0).all() and all(len(set(row)) == k for row in rows.tolist())
    # ... and whatever is still missing is id None with score -inf, never document 0.
    searcher.manifest["index"]["num_leaves"] = 1
    ids, scores = searcher.search(queries, k, leaves_to_search=1)
    assert (ids == None).any()  # noqa: E711 (element-wise on an object array)
    assert np.isneginf(scores[ids == None]).all() and np.isfinite(scores[ids != None]).all()  # noqa: E711


def test_a_bundle_with_an_unlisted_file_is_refused(bundles, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["auto"], bundle)
    (bundle / "index" / "scann_docids.pkl").write_bytes(b"\x80\x04N.")  # ScaNN's loader would unpickle this
    with pytest.raises(BundleError, match="scann_docids.pkl: unexpected file, not listed"):
        Searcher.load(bundle)
    with pytest.raises(BundleError, match="not a directory"):
        Searcher.load(tmp_path / "nowhere")


def test_search_cli_json_and_tsv(bundles, queries, tmp_path, capsys):
    np.save(tmp_path / "q.npy", queries[:2])
    ids, scores = Searcher.load(bundles["auto"]).search(queries[:2], 4)
    capsys.readouterr()
    assert main(["search", "--bundle", str(bundles["auto"]), "--queries", str(tmp_path / "q.npy"), "--k", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [[hit["id"] for hit in q["results"]] for q in out["queries"]] == ids.tolist()
    assert out["queries"][1]["query"] == 1 and out["queries"][0]["results"][0]["score"] == pytest.approx(scores[0, 0])
    assert main(["search", "--bundle", str(bundles["auto"]), "--queries", str(tmp_path / "q.npy"), "--k", "4",
                 "--format", "tsv"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 8 and lines[0][:3] == ["0", "1", ids[0, 0]] and lines[5][:3] == ["1", "2", ids[1, 1]]


@pytest.mark.parametrize("args, message", [
    (["--k", "500"], "k=500 exceeds the 400 documents"),
    (["--text", "hello"], "the bundle records no encoder"),
])
def test_search_cli_errors_are_one_line(bundles, queries, tmp_path, capsys, args, message):
    np.save(tmp_path / "q.npy", queries[:2])
    source = [] if "--text" in args else ["--queries", str(tmp_path / "q.npy")]
    capsys.readouterr()
    assert main(["search", "--bundle", str(bundles["auto"]), *source, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def _copy(bundles, tmp_path) -> Path:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["auto"], bundle)
    return bundle


def _forge(bundle: Path, edit) -> None:
    """Edits the manifest and recomputes its checksum, as a deliberate tamperer would."""
    import hashlib

    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (bundle / "manifest.json").write_bytes(data)
    (bundle / "manifest.json.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")


def test_a_dangling_symlink_in_a_bundle_is_refused(bundles, tmp_path):
    bundle = _copy(bundles, tmp_path)
    (bundle / "index" / "extra.npy").symlink_to(tmp_path / "nowhere.npy")
    with pytest.raises(BundleError, match="extra.npy: a symbolic link"):
        Searcher.load(bundle)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"].update({"../outside.npy": "0" * 64}), "'../outside.npy' is not a path inside the bundle"),
    (lambda m: m["index"].update(path="/etc"), "index.path: must be 'index'"),
    (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "'/etc/passwd' is not a path inside the bundle"),
])
def test_a_forged_manifest_cannot_point_outside_the_bundle(bundles, tmp_path, edit, message):
    bundle = _copy(bundles, tmp_path)
    _forge(bundle, edit)
    with pytest.raises(BundleError, match=message):
        Searcher.load(bundle)


def test_an_index_asset_outside_the_bundle_is_refused(bundles, tmp_path):
    import hashlib

    bundle = _copy(bundles, tmp_path)
    assets = bundle / "index" / "scann_assets.pbtxt"
    assets.write_text(assets.read_text().replace('"dataset.npy"', '"/tmp/elsewhere/dataset.npy"'))
    _forge(bundle, lambda m: m["files"].update(
        {"index/scann_assets.pbtxt": hashlib.sha256(assets.read_bytes()).hexdigest()}))
    with pytest.raises(BundleError, match="index asset '/tmp/elsewhere/dataset.npy' is not a path inside"):
        Searcher.load(bundle)


def test_signed_bundles_refuse_deliberate_edits(synthetic_dataset, bundles, queries, tmp_path, capsys):
    key = tmp_path / "key"
    key.write_bytes(b"0123456789abcdef-a-secret")
    run = bundles["auto"].parent / "run"
    signed = tmp_path / "signed"
    assert main(["export", "--workdir", str(run), "--out", str(signed), "--sign-key-file", str(key)]) == 0
    from esep_jax.export.format import read_key

    Searcher.load(signed, key=read_key(str(key))).search(queries[:2], 3)  # intact and signed: loads
    with pytest.raises(BundleError, match="the bundle is not signed"):
        Searcher.load(bundles["auto"], key=read_key(str(key)))
    other = tmp_path / "other-key"
    other.write_bytes(b"another-key-of-16-bytes")
    with pytest.raises(BundleError, match="does not match the manifest under this key"):
        Searcher.load(signed, key=read_key(str(other)))
    _forge(signed, lambda m: m["eval"]["head"].update({"ndcg@10": 0.99}))  # fake metrics, checksum recomputed
    Searcher.load(signed)  # without the key only integrity is checked: the forgery passes, as documented
    with pytest.raises(BundleError, match="does not match the manifest under this key"):
        Searcher.load(signed, key=read_key(str(key)))
    np.save(tmp_path / "q.npy", queries[:2])
    capsys.readouterr()
    assert main(["search", "--bundle", str(signed), "--queries", str(tmp_path / "q.npy"), "--key-file", str(key)]) == 2
    assert "does not match" in capsys.readouterr().err


def test_search_piped_into_a_closed_reader_ends_quietly(bundles, queries, tmp_path):
    """`esep-jax search … | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    np.save(tmp_path / "q.npy", np.repeat(queries, 100, axis=0))  # 2,000 queries: far more than a pipe buffer
    search = subprocess.Popen([sys.executable, "-m", "esep_jax", "search", "--bundle", str(bundles["auto"]),
                               "--queries", str(tmp_path / "q.npy"), "--k", "50", "--format", "tsv"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    search.stdout.readline()
    search.stdout.close()
    _, stderr = search.communicate(timeout=120)
    assert search.returncode == 0 and b"Traceback" not in stderr and b"BrokenPipe" not in stderr


WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud ember frost "
         "meadow harbor lantern signal vector matrix kernel socket thread buffer").split()


def synthetic_texts(num_docs: int = 400, seed: int = 0) -> dict[str, dict]:
    """A title and a text of a few words per synthetic corpus id (d0 … d399), for document stores and BM25."""
    rng = np.random.default_rng(seed)
    return {f"d{i}": {"title": f"Document {i}", "text": " ".join(rng.choice(WORDS, 8)) + f"\nline two of d{i}"}
            for i in range(num_docs)}


@pytest.fixture(scope="module")
def text_bundle(bundles, tmp_path_factory) -> tuple[Path, dict]:
    """A bundle of the same run with a document store and a BM25 index (corpus file in another order)."""
    root = tmp_path_factory.mktemp("text-bundle")
    texts = synthetic_texts()
    corpus = root / "corpus.jsonl"
    order = np.random.default_rng(1).permutation(len(texts))
    ids = list(texts)
    corpus.write_text("".join(json.dumps({"_id": ids[i], **texts[ids[i]]}) + "\n" for i in order))
    out = root / "bundle"
    assert main(["export", "--workdir", str(bundles["auto"].parent / "run"), "--out", str(out),
                 "--corpus-text", str(corpus), "--bm25"]) == 0
    return out, texts


def test_documents_returned_match_the_corpus(text_bundle, bundles, queries, tmp_path, capsys):
    bundle, texts = text_bundle
    searcher = Searcher.load(bundle)
    assert searcher.has_documents and searcher.has_bm25
    manifest = searcher.manifest
    assert {"documents.jsonl", "documents.offsets.npy", "bm25/data.csc.index.npy", "bm25/vocab.index.json"} <= set(
        manifest["files"])
    assert manifest["documents"]["count"] == 400 and manifest["bm25"]["library"] == "bm25s"
    ids, _ = searcher.search(queries, 5)
    rows, _ = searcher.search_rows(queries, 5)
    documents = searcher.documents(rows)
    assert documents == [texts[doc] for doc in ids.reshape(-1)]
    np.save(tmp_path / "q.npy", queries[:2])
    capsys.readouterr()
    assert main(["search", "--bundle", str(bundle), "--queries", str(tmp_path / "q.npy"), "--k", "3",
                 "--with-documents"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [hit["document"] for hit in out["queries"][1]["results"]] == [texts[doc] for doc in ids[1, :3]]
    assert main(["search", "--bundle", str(bundles["auto"]), "--queries", str(tmp_path / "q.npy"),
                 "--with-documents"]) == 2
    assert "--with-documents: the bundle stores no documents" in capsys.readouterr().err


def test_a_tampered_document_store_is_refused(text_bundle, tmp_path):
    import shutil

    for name in ("documents.jsonl", "documents.offsets.npy", "bm25/data.csc.index.npy"):
        bundle = tmp_path / name.replace("/", "-")
        shutil.copytree(text_bundle[0], bundle)
        data = bytearray((bundle / name).read_bytes())
        data[-3] ^= 1  # one bit, same length: only the checksum can tell
        (bundle / name).write_bytes(bytes(data))
        with pytest.raises(ChecksumError, match=f"{name}: sha256 differs from manifest.json"):
            Searcher.load(bundle)
    # With checksums skipped, a record that is not its row's document is still never handed out.
    bundle = tmp_path / "swapped"
    shutil.copytree(text_bundle[0], bundle)
    path = bundle / "documents.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"id": "d0"', b'"id": "d9"', 1))
    searcher = Searcher.load(bundle, verify_checksums=False)
    with pytest.raises(BundleError, match="documents.jsonl: record 0 is not the document 'd0'"):
        searcher.documents([0])
    assert searcher.documents([1, -1]) == [text_bundle[1]["d1"], None]


def test_hybrid_search_is_rrf_of_the_dense_and_bm25_lists(text_bundle, bundles, queries, tmp_path, capsys):
    from esep_jax.evaluation.fusion import reciprocal_rank_fusion
    from esep_jax.serving import Fusion

    bundle, texts = text_bundle
    searcher = Searcher.load(bundle)
    words = [" ".join(texts[f"d{3 * i}"]["text"].split()[:3]) for i in range(len(queries))]
    fusion = Fusion(k_rrf=20, dense_weight=1.0, bm25_weight=0.7, depth=30)
    ids, scores = searcher.search(queries, 10, hybrid=fusion, query_texts=words)
    dense, _ = searcher.search(queries, 30)
    lexical, _ = searcher.search_bm25(words, 30)
    for q in range(len(queries)):
        expected = reciprocal_rank_fusion([dense[q].tolist(), [d for d in lexical[q] if d is not None]],
                                          [1.0, 0.7], 20)[:10]
        assert ids[q].tolist() == [doc for doc, _ in expected]
        np.testing.assert_allclose(scores[q], [s for _, s in expected], rtol=1e-6)
    assert f"d{0}" in lexical[0].tolist()  # the words come from d0: BM25 finds it
    with pytest.raises(QueryError, match="the bundle has no BM25 index"):
        Searcher.load(bundles["auto"]).search(queries, 5, hybrid=True, query_texts=words)
    with pytest.raises(QueryError, match="3 query texts for 20 query embeddings"):
        searcher.search(queries, 5, hybrid=True, query_texts=words[:3])
    capsys.readouterr()
    assert main(["search", "--bundle", str(bundle), "--text", words[0], "--text", words[1], "--bm25-only",
                 "--k", "4", "--format", "trec"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [line[2] for line in lines[:4]] == [d for d in lexical[0, :4]] and lines[0][5] == "esep_jax-bm25"


def test_hybrid_search_and_documents_need_no_jax(text_bundle, queries, tmp_path):
    np.save(tmp_path / "q.npy", queries[:2])
    script = BLOCK_HEAVY_IMPORTS + f"""
import json
import numpy as np
from esep_jax.serving import Searcher
searcher = Searcher.load({str(text_bundle[0])!r})
ids, _ = searcher.search(np.load({str(tmp_path / 'q.npy')!r}), 3, hybrid=True, query_texts=["alpha beta", "frost"])
rows, _ = searcher.search_rows(np.load({str(tmp_path / 'q.npy')!r}), 3)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "tensorstore", "orbax", "bm25s"))
print(json.dumps({{"ids": ids.tolist(), "documents": searcher.documents(rows), "heavy": heavy}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["heavy"] == [] and len(payload["documents"]) == 6  # bm25s itself is not needed to serve
    expected, _ = Searcher.load(text_bundle[0]).search(queries[:2], 3, hybrid=True, query_texts=["alpha beta", "frost"])
    assert payload["ids"] == expected.tolist()


def test_without_pystemmer_a_bm25_bundle_still_serves_dense_and_says_why_hybrid_cannot(text_bundle, queries,
                                                                                          tmp_path):
    np.save(tmp_path / "q.npy", queries[:2])
    script = BLOCK_HEAVY_IMPORTS.replace('"optax")', '"optax", "Stemmer")') + f"""
import numpy as np
from esep_jax.serving import QueryError, Searcher
searcher = Searcher.load({str(text_bundle[0])!r})
queries = np.load({str(tmp_path / 'q.npy')!r})
print(searcher.search(queries, 3)[0].shape, searcher.has_bm25)
try:
    searcher.search(queries, 3, hybrid=True, query_texts=["alpha", "beta"])
except QueryError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["(2, 3) False",
                                          "BM25 queries need PyStemmer: pip install 'esep-jax[hybrid]'"]
