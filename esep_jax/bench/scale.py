"""`esep-jax bench scale`: an MS MARCO-sized corpus on one machine — ingest, one timed train step, one exact
evaluation — with the peak memory each took.

The synthetic dataset (clustered unit vectors, queries that are noisy copies of one document each, a train and
a test split) is written block by block straight into the dataset format in the storage dtype, so neither the
float32 corpus nor even the whole stored corpus is ever in memory at once. Training and evaluation then use the
real path: the corpus is placed on the devices shard by shard from tensorstore (`ShardedCorpus`, one device's
rows at a time), the real jitted step runs once after compiling, and dev/test retrieval is the trainer's own
`ShardedExactIndex` over the same device arrays.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import resource
import time
from pathlib import Path

import numpy as np

from esep_jax.atomic import atomic_directory
from esep_jax.data.dataset import FORMAT_VERSION, MANIFEST, Qrels, create_array, write_ids, write_qrels
from esep_jax.errors import storage_errors

BLOCK_ROWS = 65536


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_synthetic_dataset(out: str, num_docs: int, dim: int, num_queries: int, *, dtype: str = "bfloat16",
                            clusters: int = 4096, seed: int = 0, log=print) -> dict:
    """Writes the dataset; returns its manifest (with the seconds and peak memory the write took)."""
    started, rng = time.perf_counter(), np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sources = np.sort(rng.choice(num_docs, num_queries, replace=False))  # each query's relevant document
    hasher = hashlib.sha256()
    with storage_errors(f"the dataset {out}"), atomic_directory(out, overwrite=True) as tmp:
        corpus, _ = create_array(tmp, "corpus/embeddings", (num_docs, dim), dtype)
        queries = np.empty((num_queries, dim), np.float32)
        for start in range(0, num_docs, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, num_docs)
            block_rng = np.random.default_rng([seed, start])
            block = centres[block_rng.integers(0, clusters, stop - start)] + 0.6 * block_rng.standard_normal(
                (stop - start, dim), dtype=np.float32) / np.sqrt(dim)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            stored = block.astype(corpus.dtype.numpy_dtype)
            corpus[start:stop].write(stored).result()
            hasher.update(stored.tobytes())
            here = (sources >= start) & (sources < stop)
            noisy = block[sources[here] - start] + 0.8 * block_rng.standard_normal((here.sum(), dim),
                                                                                   dtype=np.float32) / np.sqrt(dim)
            queries[here] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
            if start // BLOCK_ROWS % 16 == 0:
                log(f"wrote {stop:,} of {num_docs:,} documents")
        query_table, _ = create_array(tmp, "queries/embeddings", (num_queries, dim), "float32")
        query_table.write(queries).result()
        write_ids(tmp, "corpus_ids.txt", [f"d{i}" for i in range(num_docs)], hasher)
        write_ids(tmp, "query_ids.txt", [f"q{i}" for i in range(num_queries)], hasher)
        split = num_queries * 9 // 10
        for name, rows in (("train", np.arange(split)), ("test", np.arange(split, num_queries))):
            qrels = Qrels.from_lists(rows, [(np.array([sources[r]]), np.array([1])) for r in rows])
            write_qrels(tmp, name, qrels, hasher)
        manifest = {
            "format_version": FORMAT_VERSION, "name": f"synthetic-{num_docs}x{dim}", "encoder": None,
            "query_prompt": "", "document_prompt": "", "normalized": True,
            "corpus": {"count": num_docs, "dim": dim, "dtype": dtype, "source": "synthetic (esep-jax bench scale)"},
            "queries": {"count": num_queries, "dim": dim, "dtype": "float32", "source": "synthetic"},
            "splits": {"train": {"queries": split, "judgements": split, "relevant": split, "source": "synthetic"},
                       "test": {"queries": num_queries - split, "judgements": num_queries - split,
                                "relevant": num_queries - split, "source": "synthetic"}},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": hasher.hexdigest(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "write_s": time.perf_counter() - started, "write_peak_bytes": _peak_rss()}


def measure_scale(data: str, *, batch: int, corpus_shards: int, chunk: int = 8192, eval_queries: int = 256,
                  micro_batch: int = 0, log=print) -> dict:
    """One timed train step (compiled ahead of time) and one exact evaluation of `eval_queries` test queries."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from esep_jax.config import load_config
    from esep_jax.data.loader import TrainBatches
    from esep_jax.evaluation.evaluator import SplitEvaluator
    from esep_jax.evaluation.retrieval import ShardedExactIndex
    from esep_jax.objectives import CORPUS
    from esep_jax.objectives.corpus_softmax import DATA, ShardedCorpus
    from esep_jax.runs.state import run_components
    from esep_jax.training.plan import plan_training
    from esep_jax.training.step import make_train_step

    config = load_config(None, [f"train.batch_size={batch}", f"train.corpus_shards={corpus_shards}",
                                f"train.corpus_chunk={chunk}", f"train.micro_batch_size={micro_batch}",
                                "train.corpus_dtype=bfloat16", "loss.negatives=all", "train.new_document_fraction=0",
                                "train.dev_split=test", "train.memory_fraction=1.0"])
    plan = plan_training(config, data)
    dataset, mesh = plan.dataset, plan.mesh
    started = time.perf_counter()
    corpus = ShardedCorpus(dataset.corpus_table(), mesh, chunk, jax.numpy.bfloat16)
    jax.block_until_ready(corpus.embeddings)
    placed = time.perf_counter() - started
    log(f"placed {dataset.num_documents:,} documents on {jax.device_count()} devices in {placed:.0f} s")
    head, optimizer, schedule, fresh_state = run_components(config, dataset.query_dim, dataset.corpus_dim)
    step = jax.jit(make_train_step(head, optimizer, schedule, config, mesh, plan.terms), donate_argnums=(0,))
    state = jax.device_put(fresh_state(), NamedSharding(mesh, P()))
    batches = TrainBatches(dataset, plan.train_qrels, batch_size=batch, max_positives=1, seed=0, prefetch=0)
    tables = {CORPUS: (corpus.embeddings, corpus.logit_bias)}
    # Compiled ahead of time rather than by a first step: at MS MARCO scale on a CPU one step takes many minutes,
    # and a warm-up step would double the benchmark for nothing.
    placed_batch = jax.device_put(batches.batch_at(0), NamedSharding(mesh, P(DATA)))
    start = time.perf_counter()
    compiled = step.lower(state, placed_batch, tables).compile()
    compile_s = time.perf_counter() - start
    log(f"compiled in {compile_s:.1f} s")
    start = time.perf_counter()
    state, metrics = compiled(state, placed_batch, tables)
    jax.block_until_ready(metrics)
    step_s = time.perf_counter() - start
    log(f"one step: {step_s:.1f} s")
    index = ShardedExactIndex(corpus.embeddings, dataset.num_documents, mesh, corpus.chunk)
    qrels = dataset.qrels("test")
    qrels = qrels.subset(np.arange(min(eval_queries, qrels.num_queries)))
    evaluator = SplitEvaluator(dataset, qrels, index, top_k=100, query_chunk=eval_queries)
    start = time.perf_counter()
    metrics = evaluator.rank().metrics
    evaluation_s = time.perf_counter() - start
    log(f"exact evaluation of {qrels.num_queries} queries: {evaluation_s:.1f} s")
    flops = 4.0 * batch * dataset.num_documents * dataset.corpus_dim
    return {"documents": dataset.num_documents, "dim": dataset.corpus_dim, "dtype": "bfloat16", "batch": batch,
            "devices": jax.device_count(), "corpus_shards": corpus_shards, "place_s": placed,
            "compile_s": compile_s, "step_s": step_s, "achieved_flops": flops / step_s,
            "eval_queries": qrels.num_queries, "eval_s": evaluation_s, "eval_recall@100": metrics["recall@100"],
            "corpus_bytes": corpus.nbytes, "peak_rss_bytes": _peak_rss(), "backend": jax.default_backend()}


def run_scale(out: str, num_docs: int, dim: int, num_queries: int, batch: int, corpus_shards: int, reuse: bool,
              log=print) -> dict:
    """Writes (unless `reuse` and it exists) then measures; the record of both."""
    record = {}
    if not (reuse and (Path(out) / MANIFEST).exists()):
        written = write_synthetic_dataset(out, num_docs, dim, num_queries, log=log)
        record.update(write_s=written["write_s"], write_peak_bytes=written["write_peak_bytes"])
    record.update(measure_scale(out, batch=batch, corpus_shards=corpus_shards, log=log))
    return record
