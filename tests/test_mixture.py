"""Mixing datasets: rows, ids and qrels line up with the sources; weights; refusals; atomicity; a training run."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ingest_args, write_synthetic_sources
from esep_jax.cli import main
from esep_jax.data import mixture
from esep_jax.data.dataset import Dataset
from esep_jax.data.mixture import MixtureSource, mix_datasets, parse_sources
from esep_jax.errors import InputError, StorageError


def _ingest(root: Path, name: str, **options) -> str:
    sources = write_synthetic_sources(root / f"{name}-src", **options)
    assert main(ingest_args(sources, root / name)) == 0
    return str(root / name)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Two small datasets of different sizes and storage dtypes, and a third with another dim."""
    root = tmp_path_factory.mktemp("mixture-sources")
    return {"a": _ingest(root, "a", num_docs=60, num_queries=40, dim=8, seed=1),
            "b": _ingest(root, "b", num_docs=45, num_queries=30, dim=8, seed=2, dtype=np.float16),
            "wide": _ingest(root, "wide", num_docs=20, num_queries=20, dim=12, seed=3)}


def _triples(dataset: Dataset, split: str, prefix: str = "") -> collections.Counter:
    """(query id, doc id, grade) of every judgement of a split, with multiplicity."""
    qrels, query_ids, doc_ids = dataset.qrels(split), dataset.ids("queries"), dataset.ids("corpus")
    triples = collections.Counter()
    for i in range(qrels.num_queries):
        docs, grades = qrels.judgements(i)
        triples.update((prefix + query_ids[qrels.query_rows[i]], prefix + doc_ids[d], int(g))
                       for d, g in zip(docs, grades))
    return triples


def test_mixture_concatenates_rows_ids_and_qrels(sources, tmp_path):
    out = tmp_path / "mix"
    manifest = mix_datasets([MixtureSource("a", sources["a"]), MixtureSource("b", sources["b"], weight=3)], str(out))
    mixed, a, b = Dataset(str(out)), Dataset(sources["a"]), Dataset(sources["b"])
    # Different storage dtypes become float32; rows are the sources' rows in order.
    assert mixed.corpus_table().dtype.name == mixed.query_table().dtype.name == "float32"
    np.testing.assert_array_equal(mixed.read_corpus(), np.concatenate([a.read_corpus(), b.read_corpus()]))
    np.testing.assert_array_equal(mixed.read_queries(np.arange(70)),
                                  np.concatenate([a.read_queries(np.arange(40)), b.read_queries(np.arange(30))]))
    assert mixed.ids("corpus") == [f"a:{i}" for i in a.ids("corpus")] + [f"b:{i}" for i in b.ids("corpus")]
    assert mixed.ids("queries")[38:42] == ["a:q38", "a:q39", "b:q0", "b:q1"]
    # Every mixed judgement is a source judgement, by ids; train repeats b's three times.
    for split in ("dev", "test"):
        assert _triples(mixed, split) == _triples(a, split, "a:") + _triples(b, split, "b:")
    b_train = _triples(b, "train", "b:")
    assert _triples(mixed, "train") == _triples(a, "train", "a:") + b_train + b_train + b_train
    for split in ("train", "dev", "test"):
        assert _triples(mixed, f"{split}.a") == _triples(a, split, "a:")
        assert _triples(mixed, f"{split}.b") == _triples(b, split, "b:")
    assert mixed.splits == sorted(["train", "dev", "test"] + [f"{s}.{n}" for s in ("train", "dev", "test")
                                                              for n in "ab"])
    assert manifest == json.loads((out / "dataset.json").read_text())
    first, second = manifest["mixture"]["sources"]
    assert first["name"] == "a" and first["weight"] == 1 and first["location"] == str(Path(sources["a"]).absolute())
    assert second["corpus"] == {"count": 45, "rows": [60, 105]} and second["queries"]["rows"] == [40, 70]
    assert second["train_share"] == pytest.approx(3 * 21 / (28 + 3 * 21), abs=1e-6)
    assert "uniformly" in manifest["mixture"]["sampling"]
    assert manifest["splits"]["train"]["source"] == "a:train + b:train x3"


def test_weights_repeat_training_queries(sources, tmp_path):
    mix_datasets(parse_sources([f"a={sources['a']}", f"b={sources['b']}"], ["a=2"]), str(tmp_path / "mix"))
    mixed = Dataset(str(tmp_path / "mix"))
    counts = collections.Counter(mixed.qrels("train").query_rows.tolist())
    assert set(counts) == set(mixed.qrels("train.a").query_rows) | set(mixed.qrels("train.b").query_rows)
    assert all(counts[row] == (2 if row < 40 else 1) for row in counts)
    assert collections.Counter(mixed.qrels("dev").query_rows.tolist()).most_common(1)[0][1] == 1


def test_equal_storage_dtypes_are_kept_and_blocks_cross_chunks(sources, tmp_path, monkeypatch):
    # 7-row chunks and 14-row copy blocks: the second source starts mid-chunk (45 = 6 * 7 + 3).
    from esep_jax.data import dataset as dataset_module

    monkeypatch.setattr(dataset_module, "chunk_rows", lambda dim, itemsize: 7)  # used by create_array
    monkeypatch.setattr(mixture, "CHUNKS_PER_BLOCK", 2)
    mix_datasets([MixtureSource("x", sources["b"]), MixtureSource("y", sources["b"])], str(tmp_path / "mix"))
    mixed = Dataset(str(tmp_path / "mix"))
    assert mixed.corpus_table().dtype.name == "float16"
    corpus, queries = Dataset(sources["b"]).read_corpus(), Dataset(sources["b"]).read_queries(np.arange(30))
    np.testing.assert_array_equal(mixed.read_corpus(), np.concatenate([corpus, corpus]))
    np.testing.assert_array_equal(mixed.read_queries(np.arange(60)), np.concatenate([queries, queries]))
    assert mixed.corpus_table().chunk_layout.read_chunk.shape == (7, 8)


def _refused(capsys, args: list[str], *fragments: str) -> None:
    out = Path(args[args.index("--out") + 1])
    assert main(args) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("esep-jax: error: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_dim_mismatch_names_the_manifest_and_field(sources, tmp_path, capsys):
    _refused(capsys, ["mix", "--out", str(tmp_path / "mix"), "--dataset", f"a={sources['a']}",
                      "--dataset", f"w={sources['wide']}"],
             f"{sources['wide']}/dataset.json: corpus.dim: 12 != 8 of 'a'")


def test_encoder_mismatch_names_the_manifest_and_field(sources, tmp_path, capsys):
    copies = {}
    for name, encoder in (("e1", "model-one"), ("e2", "model-two")):
        copies[name] = tmp_path / name
        mix_datasets([MixtureSource("a", sources["a"]), MixtureSource("b", sources["b"])], str(copies[name]))
        manifest = json.loads((copies[name] / "dataset.json").read_text())
        (copies[name] / "dataset.json").write_text(json.dumps({**manifest, "encoder": encoder}))
    _refused(capsys, ["mix", "--out", str(tmp_path / "mix"), "--dataset", f"one={copies['e1']}",
                      "--dataset", f"two={copies['e2']}"], f"{copies['e2']}/dataset.json: encoder: 'model-two'")


@pytest.mark.parametrize("datasets, weights, fragment", [
    (["a=A", "a=B"], [], "--dataset: name 'a' given twice"),
    (["a=A"], [], "at least 2 datasets, got 1"),
    (["a=A", "bPATH"], [], "--dataset: expected NAME=PATH, got 'bPATH'"),
    (["a=A", "b:c=B"], [], "name 'b:c' may only use"),
    (["a=A", "b=B"], ["a=0"], "--weight: weight '0' of 'a' is not a positive integer"),
    (["a=A", "b=B"], ["a=1.5"], "not a positive integer"),
    (["a=A", "b=B"], ["c=2"], "--weight: no --dataset named 'c'"),
    (["a=A", "b=B"], ["a=2", "a=3"], "weight of 'a' given twice"),
])
def test_bad_arguments(datasets, weights, fragment):
    with pytest.raises(InputError) as error:
        parse_sources(datasets, weights)
    assert fragment in str(error.value)


def test_missing_source_is_refused(sources, tmp_path, capsys):
    _refused(capsys, ["mix", "--out", str(tmp_path / "mix"), "--dataset", f"a={sources['a']}",
                      "--dataset", f"b={tmp_path / 'nope'}"], "nope/dataset.json", "not found")


def test_failure_before_rename_leaves_nothing(sources, tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(mixture, "write_qrels", fail)
    with pytest.raises(StorageError, match="disk full"):
        mix_datasets([MixtureSource("a", sources["a"]), MixtureSource("b", sources["b"])], str(tmp_path / "mix"))
    assert list(tmp_path.iterdir()) == []


def test_cli_mix_then_train_and_evaluate_per_source(sources, tmp_path, capsys):
    from esep_jax.config import load_config
    from esep_jax.training.loop import train_and_evaluate

    out = tmp_path / "mix"
    assert main(["mix", "--out", str(out), "--dataset", f"a={sources['a']}", "--dataset", f"b={sources['b']}",
                 "--weight", "b=2", "--name", "ab"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: 105 documents x 8, 70 queries") and "weight 2" in printed
    assert Dataset(str(out)).manifest["name"] == "ab"
    assert main(["mix", "--out", str(out), "--dataset", f"a={sources['a']}", "--dataset", f"b={sources['b']}"]) == 2
    assert "already exists" in capsys.readouterr().err

    config = load_config(None, ["train.num_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
                                "train.batch_size=16", "train.log_every=3", "optim.warmup_steps=1"])
    summary = train_and_evaluate(config, str(out), tmp_path / "run", progress=False)
    assert summary["steps"] == 6 and summary["dev_split"] == "dev"
    assert main(["eval", "--data", str(out), "--split", "test.b", "--workdir", str(tmp_path / "run"),
                 "--json", str(tmp_path / "test_b.json")]) == 0
    result = json.loads((tmp_path / "test_b.json").read_text())
    assert result["split"] == "test.b" and result["queries"] == Dataset(sources["b"]).qrels("test").num_queries
    # The mixed run's head also applies to a source dataset on its own (same dims).
    assert main(["eval", "--data", sources["a"], "--split", "test", "--workdir", str(tmp_path / "run")]) == 0
