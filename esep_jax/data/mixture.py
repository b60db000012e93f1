"""Mixes several datasets into one, so a single run trains on all of them (`esep-jax mix`).

The mixture is an ordinary dataset directory (same format as `ingest` writes, read by `Dataset`), so `train`,
`eval` and `export` need no change:

- corpus and queries are the sources' tables concatenated in source order, ids prefixed `<name>:`;
- every split present in any source is the union of that split's qrels (rows offset into the new tables),
  and each source's split is also kept on its own as `<split>.<name>` (e.g. `test.nf`) to evaluate one source
  against the mixed corpus;
- training weights: the loader samples training queries uniformly (one seeded permutation of the `train`
  split per epoch), so a source's share of training is set by repeating its training queries `weight` times
  in `train` (default 1: shares proportional to the sources' numbers of training queries). `train.<name>`
  splits are not repeated. A mixture without any `dev` split has the trainer hold out part of a `train` that
  may contain repeats, so give weights > 1 only to sources that come with a dev split.

Sources must agree on corpus dim, query dim and (where recorded) encoder and prompts. Embeddings are copied
in row blocks through tensorstore, never whole; each table keeps its storage dtype if all sources share it,
else float32. Everything is validated before anything is written, and the output appears atomically.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import tensorstore as ts

from esep_jax.atomic import atomic_directory
from esep_jax.data.dataset import FORMAT_VERSION, MANIFEST, Dataset, Qrels, create_array, write_qrels
from esep_jax.errors import InputError, storage_errors

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
SAMPLING_NOTE = ("the loader samples training queries uniformly, so each source's training queries are repeated "
                 "`weight` times in the `train` split: its share of training batches is weight x its training "
                 "queries / the total; `train.<name>` splits are not repeated")
# Row blocks of the copy: a multiple of the output chunk rows (~4 MiB), so ~64 MiB per block in flight.
CHUNKS_PER_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One dataset of a mixture: its short name (id prefix, split suffix), location and training weight."""

    name: str
    location: str
    weight: int = 1


def parse_sources(dataset_specs: list[str], weight_specs: list[str] = ()) -> list[MixtureSource]:
    """`--dataset NAME=PATH` (at least two) and `--weight NAME=W` (positive integer) → sources, in order."""
    locations: dict[str, str] = {}
    for spec in dataset_specs:
        name, sep, location = spec.partition("=")
        if not sep or not name or not location:
            raise InputError(f"expected NAME=PATH, got {spec!r}", field="--dataset")
        if not NAME_PATTERN.fullmatch(name):
            raise InputError(f"name {name!r} may only use letters, digits, '_' and '-'", field="--dataset")
        if name in locations:
            raise InputError(f"name {name!r} given twice", field="--dataset")
        locations[name] = location
    if len(locations) < 2:
        raise InputError(f"a mixture needs at least 2 datasets, got {len(locations)}", field="--dataset")
    weights: dict[str, int] = {}
    for spec in weight_specs:
        name, sep, text = spec.partition("=")
        if not sep or not name or not text:
            raise InputError(f"expected NAME=WEIGHT, got {spec!r}", field="--weight")
        if name not in locations:
            raise InputError(f"no --dataset named {name!r} (datasets: {', '.join(locations)})", field="--weight")
        if name in weights:
            raise InputError(f"weight of {name!r} given twice", field="--weight")
        if not text.isdigit() or int(text) < 1:
            raise InputError(f"weight {text!r} of {name!r} is not a positive integer", field="--weight")
        weights[name] = int(text)
    return [MixtureSource(name, location, weights.get(name, 1)) for name, location in locations.items()]


def mix_datasets(sources: list[MixtureSource], out: str, *, name: str | None = None,
                 overwrite: bool = False) -> dict:
    """Writes the mixture of `sources` to `out` atomically; returns its manifest."""
    _check_names(sources)
    datasets = [Dataset(source.location) for source in sources]
    _check_compatible(sources, datasets, out)
    corpus_offsets = np.cumsum([0] + [d.num_documents for d in datasets])
    query_offsets = np.cumsum([0] + [int(d.manifest["queries"]["count"]) for d in datasets])
    splits = _mixed_splits(sources, datasets, corpus_offsets, query_offsets)
    corpus_dtype = _common_dtype(datasets, "corpus")
    query_dtype = _common_dtype(datasets, "queries")
    encoder = _encoder_fields(datasets)
    names = ", ".join(source.name for source in sources)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name or Path(out).name,
        **encoder,
        "normalized": all(bool(d.manifest.get("normalized")) for d in datasets),
        "corpus": {"count": int(corpus_offsets[-1]), "dim": datasets[0].corpus_dim, "dtype": corpus_dtype,
                   "source": f"mixture of {names}"},
        "queries": {"count": int(query_offsets[-1]), "dim": datasets[0].query_dim, "dtype": query_dtype,
                    "source": f"mixture of {names}"},
        "splits": {split: {"queries": qrels.num_queries, "judgements": int(qrels.grades.shape[0]),
                           "relevant": int((qrels.grades > 0).sum()), "source": origin}
                   for split, (qrels, origin) in splits.items()},
        "mixture": {
            "sampling": SAMPLING_NOTE,
            "sources": [_source_record(source, dataset, corpus_offsets[i], query_offsets[i], splits)
                        for i, (source, dataset) in enumerate(zip(sources, datasets))],
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # The mixture's content is a function of its sources' content, names and weights.
        "fingerprint": hashlib.sha256(json.dumps(
            [[s.name, s.weight, d.fingerprint] for s, d in zip(sources, datasets)]).encode()).hexdigest(),
    }
    with storage_errors(f"the dataset {out}"), atomic_directory(out, overwrite=overwrite) as tmp:
        copy_rows(tmp, "corpus/embeddings", [d.corpus_table() for d in datasets], corpus_dtype)
        copy_rows(tmp, "queries/embeddings", [d.query_table() for d in datasets], query_dtype)
        for key, table in (("corpus_ids.txt", "corpus"), ("query_ids.txt", "queries")):
            with open(tmp / key, "w", encoding="utf-8") as handle:
                for source, dataset in zip(sources, datasets):
                    handle.writelines(f"{source.name}:{identifier}\n" for identifier in dataset.ids(table))
        for split, (qrels, _) in splits.items():
            write_qrels(tmp, split, qrels)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def copy_rows(directory: Path, key: str, tables: list[ts.TensorStore], dtype: str) -> None:
    """Concatenates 2-D tables by rows into a new zarr3 array, one row block in memory (plus one being written)."""
    store, rows = create_array(directory, key, (sum(t.shape[0] for t in tables), tables[0].shape[1]), dtype)
    target = store.dtype.numpy_dtype
    block, offset, writing = rows * CHUNKS_PER_BLOCK, 0, None
    for table in tables:
        for start in range(0, table.shape[0], block):
            end = min(start + block, table.shape[0])  # tensorstore slices do not clamp
            values = table[start:end].read().result().astype(target, copy=False)
            if writing is not None:  # the previous block's write overlapped this read; blocks share edge chunks
                writing.result()
            writing = store[offset + start:offset + end].write(values)
        offset += table.shape[0]
    if writing is not None:
        writing.result()


def _check_names(sources: list[MixtureSource]) -> None:
    if len(sources) < 2:
        raise InputError(f"a mixture needs at least 2 datasets, got {len(sources)}", field="--dataset")
    seen: set[str] = set()
    for source in sources:
        if not NAME_PATTERN.fullmatch(source.name):
            raise InputError(f"name {source.name!r} may only use letters, digits, '_' and '-'", field="--dataset")
        if source.name in seen:
            raise InputError(f"name {source.name!r} given twice", field="--dataset")
        if not isinstance(source.weight, (int, np.integer)) or source.weight < 1:
            raise InputError(f"weight {source.weight!r} of {source.name!r} is not a positive integer",
                             field="--weight")
        seen.add(source.name)


def _manifest_file(dataset: Dataset) -> str:
    return f"{dataset.location}/{MANIFEST}"


def _check_compatible(sources: list[MixtureSource], datasets: list[Dataset], out: str) -> None:
    """Dims, encoder and table shapes: the first disagreement, naming the source's dataset.json and field."""
    first, first_name = datasets[0], sources[0].name
    for source, dataset in zip(sources, datasets):
        if "://" not in source.location and Path(source.location).resolve() == Path(out).resolve():
            raise InputError("the output cannot be one of the sources", file=str(out))
        for field, value, expected in (("corpus.dim", dataset.corpus_dim, first.corpus_dim),
                                       ("queries.dim", dataset.query_dim, first.query_dim)):
            if value != expected:
                raise InputError(f"{value} != {expected} of {first_name!r} ({_manifest_file(first)})",
                                 file=_manifest_file(dataset), field=field)
        for table, opened, dim in (("corpus", dataset.corpus_table(), dataset.corpus_dim),
                                   ("queries", dataset.query_table(), dataset.query_dim)):
            count = int(dataset.manifest[table]["count"])
            if tuple(opened.shape) != (count, dim):
                raise InputError(f"{table}/embeddings has shape {tuple(opened.shape)}, the manifest says "
                                 f"({count}, {dim})", file=_manifest_file(dataset), field=f"{table}.count")
    recorded = [(s, d) for s, d in zip(sources, datasets) if d.manifest.get("encoder")]
    for source, dataset in recorded[1:]:
        reference_source, reference = recorded[0]
        for field in ("encoder", "query_prompt", "document_prompt"):
            value, expected = dataset.manifest.get(field) or "", reference.manifest.get(field) or ""
            if value != expected:
                raise InputError(f"{value!r} != {expected!r} of {reference_source.name!r} "
                                 f"({_manifest_file(reference)})", file=_manifest_file(dataset), field=field)


def _encoder_fields(datasets: list[Dataset]) -> dict:
    """The encoder and prompts of the sources that record an encoder (all equal by then), else the first's."""
    recorded = [d for d in datasets if d.manifest.get("encoder")] or datasets[:1]
    return {field: recorded[0].manifest.get(field, None if field == "encoder" else "")
            for field in ("encoder", "query_prompt", "document_prompt")}


def _common_dtype(datasets: list[Dataset], table: str) -> str:
    dtypes = {d.manifest[table]["dtype"] for d in datasets}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _offset(qrels: Qrels, query_offset: int, doc_offset: int) -> Qrels:
    return Qrels(query_rows=(qrels.query_rows.astype(np.int64) + query_offset).astype(np.int32),
                 offsets=qrels.offsets.astype(np.int64),
                 doc_rows=(qrels.doc_rows.astype(np.int64) + doc_offset).astype(np.int32),
                 grades=qrels.grades.astype(np.int32))


def _concatenate(parts: list[Qrels]) -> Qrels:
    starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
    return Qrels(query_rows=np.concatenate([p.query_rows for p in parts]).astype(np.int32),
                 offsets=np.concatenate([[0]] + [p.offsets[1:] + start for p, start in zip(parts, starts)])
                 .astype(np.int64),
                 doc_rows=np.concatenate([p.doc_rows for p in parts]).astype(np.int32),
                 grades=np.concatenate([p.grades for p in parts]).astype(np.int32))


def _mixed_splits(sources, datasets, corpus_offsets, query_offsets) -> dict[str, tuple[Qrels, str]]:
    """{split: (qrels, origin)}: the union of each split, the `train` union repeated by weight, per-source splits."""
    if corpus_offsets[-1] > np.iinfo(np.int32).max or query_offsets[-1] > np.iinfo(np.int32).max:
        raise InputError(f"{corpus_offsets[-1]} documents / {query_offsets[-1]} queries exceed int32 rows")
    union: dict[str, list[tuple[Qrels, str]]] = {}
    per_source: dict[str, tuple[Qrels, str]] = {}
    for i, (source, dataset) in enumerate(zip(sources, datasets)):
        for split in dataset.splits:
            qrels = _offset(dataset.qrels(split), int(query_offsets[i]), int(corpus_offsets[i]))
            repeats = source.weight if split == "train" else 1
            union.setdefault(split, []).extend([(qrels, f"{source.name}:{split}")] * repeats)
            per_source[f"{split}.{source.name}"] = (qrels, f"{source.location} {split}")
    clash = sorted(set(union) & set(per_source))
    if clash:
        raise InputError(f"split {clash[0]!r} of a source clashes with the per-source split of the same name; "
                         f"rename the source", field="--dataset")
    mixed = {}
    for split, parts in union.items():
        counts: dict[str, int] = {}
        for _, origin in parts:
            counts[origin] = counts.get(origin, 0) + 1
        origin = " + ".join(f"{name} x{count}" if count > 1 else name for name, count in counts.items())
        mixed[split] = (_concatenate([qrels for qrels, _ in parts]), origin)
    return {**mixed, **per_source}


def _source_record(source: MixtureSource, dataset: Dataset, corpus_offset, query_offset, splits) -> dict:
    location = source.location if "://" in source.location else str(Path(source.location).absolute())
    queries = int(dataset.manifest["queries"]["count"])
    train = splits.get("train")
    own_train = dataset.qrels("train").num_queries if "train" in dataset.manifest["splits"] else 0
    return {
        "name": source.name,
        "location": location,
        "dataset_name": dataset.manifest.get("name"),
        "weight": int(source.weight),
        "corpus": {"count": dataset.num_documents, "rows": [int(corpus_offset), int(corpus_offset) +
                                                            dataset.num_documents]},
        "queries": {"count": queries, "rows": [int(query_offset), int(query_offset) + queries]},
        "splits": {split: dataset.qrels(split).num_queries for split in dataset.splits},
        "train_share": round(source.weight * own_train / train[0].num_queries, 6) if train else 0.0,
    }
