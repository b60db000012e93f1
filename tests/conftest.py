"""Shared fixtures: small synthetic datasets on disk, and the real NFCorpus when ../shared is present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Prepended to a child script: every import of these packages fails, as on a serving host without them.
BLOCK_HEAVY_IMPORTS = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax", "tensorstore", "orbax", "optax"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
"""
SHARED_DATA = Path(os.environ.get("ESEP_SHARED_DATA", REPO.parent / "shared" / "data"))


def write_synthetic_sources(directory: Path, *, num_docs=400, num_queries=300, dim=16, query_dim=None,
                            seed=0, positives_per_query=(1, 4), dtype=np.float32) -> dict:
    """A learnable retrieval task in the layout users bring: .npy + id files + BEIR qrels TSVs.

    Queries are noisy images of their relevant documents under a fixed linear distortion, so the base
    embeddings retrieve imperfectly and a linear head can undo the distortion.
    """
    rng = np.random.default_rng(seed)
    query_dim = query_dim or dim
    corpus = rng.normal(size=(num_docs, dim))
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    distortion = np.eye(dim, query_dim) + 0.6 * rng.normal(size=(dim, query_dim)) / np.sqrt(dim)
    positives = [rng.choice(num_docs, rng.integers(*positives_per_query, endpoint=True), replace=False)
                 for _ in range(num_queries)]
    queries = np.stack([corpus[p].mean(axis=0) @ distortion for p in positives])
    queries += 0.05 * rng.normal(size=queries.shape)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "corpus.npy", corpus.astype(dtype))
    np.save(directory / "queries.npy", queries.astype(dtype))
    doc_ids = [f"d{i}" for i in range(num_docs)]
    query_ids = [f"q{i}" for i in range(num_queries)]
    (directory / "corpus_ids.txt").write_text("\n".join(doc_ids) + "\n")
    (directory / "query_ids.txt").write_text("\n".join(query_ids) + "\n")
    splits = {"train": range(0, int(num_queries * 0.7)), "dev": range(int(num_queries * 0.7), int(num_queries * 0.85)),
              "test": range(int(num_queries * 0.85), num_queries)}
    files = {}
    for split, rows in splits.items():
        lines = ["query-id\tcorpus-id\tscore"]
        for q in rows:
            for rank, d in enumerate(positives[q]):
                lines.append(f"q{q}\td{d}\t{2 if rank == 0 else 1}")
        path = directory / f"{split}.tsv"
        path.write_text("\n".join(lines) + "\n")
        files[split] = str(path)
    return {"corpus": str(directory / "corpus.npy"), "corpus_ids": str(directory / "corpus_ids.txt"),
            "queries": str(directory / "queries.npy"), "query_ids": str(directory / "query_ids.txt"),
            "qrels": files}


def ingest_args(sources: dict, out: Path, splits=("train", "dev", "test")) -> list[str]:
    args = ["ingest", "--corpus", sources["corpus"], "--corpus-ids", sources["corpus_ids"],
            "--queries", sources["queries"], "--query-ids", sources["query_ids"], "--out", str(out)]
    for split in splits:
        args += ["--qrels", f"{split}={sources['qrels'][split]}"]
    return args


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> str:
    """An ingested synthetic dataset (train/dev/test), shared read-only by the tests of a session."""
    from esep_jax.cli import main

    root = tmp_path_factory.mktemp("synthetic")
    sources = write_synthetic_sources(root / "sources")
    assert main(ingest_args(sources, root / "dataset")) == 0
    return str(root / "dataset")


@pytest.fixture(scope="session")
def nfcorpus_dataset(tmp_path_factory) -> str:
    """NFCorpus ingested from ../shared/data/nfcorpus with the documented command."""
    from esep_jax.cli import main

    source = SHARED_DATA / "nfcorpus"
    if not (source / "minilm" / "corpus.npy").exists():
        pytest.skip(f"NFCorpus not found at {source}")
    out = tmp_path_factory.mktemp("nfcorpus") / "dataset"
    cwd = os.getcwd()
    os.chdir(source)
    try:
        code = main(["ingest", "--corpus", "minilm/corpus.npy", "--corpus-ids", "minilm/corpus_ids.txt",
                     "--queries", "minilm/queries.npy", "--query-ids", "minilm/queries_ids.txt",
                     "--qrels", "train=qrels/train.tsv", "--qrels", "dev=qrels/dev.tsv",
                     "--qrels", "test=qrels/test.tsv", "--out", str(out)])
    finally:
        os.chdir(cwd)
    assert code == 0
    return str(out)


def final_train_state(workdir: Path, dataset_path: str | None = None):
    """(step, state) of the newest valid checkpoint in a run's workdir, restored read-only."""
    import jax

    from esep_jax.runs import checkpoints
    from esep_jax.runs.layout import read_run_config, read_run_info
    from esep_jax.runs.state import run_components

    config, dims = read_run_config(workdir), read_run_info(workdir)["dataset"]
    _, _, _, fresh_state = run_components(config, dims["query_dim"], dims["corpus_dim"])
    manager = checkpoints.reader(workdir)
    try:
        step, state, _ = checkpoints.newest_valid(manager, checkpoints.abstract_on_one_device(
            jax.eval_shape(fresh_state)))
    finally:
        manager.close()
    return step, state


def one_step(config, dataset, batch: dict, tables: dict, mesh=None):
    """(state after one train step from the fresh state, metrics) for a config on a dataset."""
    import jax

    from esep_jax.objectives import build_terms
    from esep_jax.objectives.corpus_softmax import make_data_corpus_mesh
    from esep_jax.runs.state import run_components
    from esep_jax.training.step import make_train_step

    mesh = mesh or make_data_corpus_mesh(1)
    head, optimizer, schedule, fresh_state = run_components(config, dataset.query_dim, dataset.corpus_dim)
    step = jax.jit(make_train_step(head, optimizer, schedule, config, mesh, build_terms(config, dataset)))
    return step(fresh_state(), batch, tables)


def assert_states_equal(a, b) -> None:
    """Bitwise equality of two train states."""
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> str:
    """The bundled demo data, ingested as launch/demo.sh does."""
    from esep_jax.cli import main

    demo = REPO / "esep_jax" / "demo_data" / "pystdlib"
    out = tmp_path_factory.mktemp("demo") / "dataset"
    args = ["ingest", "--out", str(out), "--corpus", str(demo / "minilm/corpus.npy"),
            "--corpus-ids", str(demo / "minilm/corpus_ids.txt"), "--queries", str(demo / "minilm/queries.npy"),
            "--query-ids", str(demo / "minilm/queries_ids.txt"), "--name", "pystdlib"]
    for split in ("train", "dev", "test"):
        args += ["--qrels", f"{split}={demo / 'qrels' / f'{split}.tsv'}"]
    assert main(args) == 0
    return str(out)
