"""A new-documents version of a dataset (`esep-jax new-documents`): documents "added after training".

A seeded `fraction` of the corpus is held out: every judgement of those documents is dropped from every split
but the test splits, while they stay in the corpus as candidates. A head trained on the result has never seen
them as positives (nor, with `loss.negatives=judged`, as negatives) — the normal case in production, where
documents are added to an index after the head was trained. `esep-jax eval` on the new dataset then adds the
new-documents view of test: the test queries with at least one held-out relevant document, counting only those
(the query's other relevant documents are taken out of the ranking, neither right nor wrong).

The output is an ordinary dataset (embeddings and ids copied, qrels rewritten) whose manifest records the
held-out rows (`documents/new`, zarr) with the seed and fraction; it is written atomically.
"""

from __future__ import annotations

import datetime
import hashlib
import json

import numpy as np

from esep_jax.atomic import atomic_directory
from esep_jax.data.dataset import MANIFEST, Dataset, Qrels, is_test_split, write_array, write_qrels
from esep_jax.data.mixture import copy_rows
from esep_jax.errors import InputError, storage_errors

NEW_DOCUMENTS_KEY = "documents/new"


def choose_new_documents(num_documents: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded `fraction` of the corpus rows, sorted."""
    count = int(round(fraction * num_documents))
    return np.sort(np.random.default_rng([seed, 0, 12345]).permutation(num_documents)[:count]).astype(np.int32)


def without_documents(qrels: Qrels, rows: np.ndarray) -> Qrels:
    """The qrels with every judgement of the given documents removed (queries left with none are dropped)."""
    keep = ~np.isin(qrels.doc_rows, rows)
    query_of = np.repeat(np.arange(qrels.num_queries), np.diff(qrels.offsets))
    counts = np.bincount(query_of[keep], minlength=qrels.num_queries)
    kept = counts > 0
    return Qrels(query_rows=qrels.query_rows[kept], offsets=np.concatenate([[0], np.cumsum(counts[kept])]).astype(
        np.int64), doc_rows=qrels.doc_rows[keep], grades=qrels.grades[keep])


def make_new_documents_dataset(source: str, out: str, *, fraction: float = 0.2, seed: int = 0,
                               overwrite: bool = False, name: str | None = None) -> dict:
    """Writes the new-documents version of `source` to `out`; returns its manifest."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"must be in (0, 1), got {fraction}", field="--fraction")
    dataset = Dataset(source)
    if "new_documents" in dataset.manifest:
        raise InputError("already a new-documents dataset", file=dataset.location, field="new_documents")
    if not any(is_test_split(split) for split in dataset.splits):
        raise InputError("has no test split to evaluate new documents on", file=dataset.location, field="splits")
    new_rows = choose_new_documents(dataset.num_documents, fraction, seed)
    splits = {split: dataset.qrels(split) if is_test_split(split) else without_documents(dataset.qrels(split), new_rows)
              for split in dataset.splits}
    for split, qrels in splits.items():
        if not (qrels.grades > 0).any():
            raise InputError(f"split {split!r} has no judgement left outside the held-out documents; lower "
                             "--fraction", field="--fraction")
    manifest = dict(dataset.manifest)
    manifest.pop("candidates", None)  # candidate lists were mined with the documents' judgements
    manifest.update(
        name=name or f"{dataset.manifest.get('name')}-new-documents",
        splits={split: {"queries": q.num_queries, "judgements": int(q.grades.shape[0]),
                        "relevant": int((q.grades > 0).sum()),
                        "source": f"{dataset.manifest['splits'][split].get('source')}"
                                  + ("" if is_test_split(split) else " without the new documents")}
                for split, q in splits.items()},
        new_documents={"count": int(new_rows.size), "fraction": fraction, "seed": seed,
                       "source": dataset.location, "source_fingerprint": dataset.fingerprint},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        fingerprint=hashlib.sha256(json.dumps([dataset.fingerprint, "new-documents", fraction, seed]).encode()
                                   ).hexdigest())
    with storage_errors(f"the dataset {out}"), atomic_directory(out, overwrite=overwrite) as tmp:
        copy_rows(tmp, "corpus/embeddings", [dataset.corpus_table()], dataset.manifest["corpus"]["dtype"])
        copy_rows(tmp, "queries/embeddings", [dataset.query_table()], dataset.manifest["queries"]["dtype"])
        for table, file in (("corpus", "corpus_ids.txt"), ("queries", "query_ids.txt")):
            (tmp / file).write_text("\n".join(dataset.ids(table)) + "\n", encoding="utf-8")
        for key in ("queries/targets", "paired/source", "paired/target"):
            if (key == "queries/targets" and dataset.has_query_targets) or (key.startswith("paired") and dataset.num_paired):
                table = dataset.table(key)
                copy_rows(tmp, key, [table], "float32")
        for split, qrels in splits.items():
            write_qrels(tmp, split, qrels)
        write_array(tmp, NEW_DOCUMENTS_KEY, new_rows)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
