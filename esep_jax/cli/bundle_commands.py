"""`esep-jax export | search`: serving bundles."""

from __future__ import annotations

import sys
from pathlib import Path

from esep_jax.cli.common import int_list
from esep_jax.errors import InputError

SEARCH_CHUNK = 65536  # queries searched (and held in memory) at a time


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a serving bundle: the best head (safetensors) + a tuned ScaNN index",
        description="Exports the best head of a training run and a ScaNN index over the corpus as a "
                    "self-contained directory (written atomically) that `esep-jax search` and "
                    "esep_jax.serving.Searcher load without JAX. ScaNN's leaves_to_search and reorder depth are "
                    "tuned so recall@10 against exact search reaches --target-recall on held-out queries sent "
                    "through the head.")
    parser.add_argument("--workdir", required=True, help="a training run")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--data", default=None, help="dataset (default: the one recorded in WORKDIR/run.json)")
    parser.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to reach (default 0.95)")
    parser.add_argument("--index", choices=("auto", "brute_force", "ah", "tree"), default="auto",
                        help="ScaNN index (auto: brute force < 20k docs, AH + reorder < 100k, else tree + AH)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--allow-harmful-head", action="store_true",
                        help="export a head that training flagged as worse than the base on new documents")
    parser.add_argument("--sign-key-file", default=None, metavar="PATH",
                        help="sign the manifest with HMAC-SHA256 under this key (>= 16 bytes); loaders given the "
                             "key refuse a bundle changed after export")
    parser.set_defaults(handler=_run_export)


def _run_export(args) -> int:
    from esep_jax.export.bundle import export_bundle

    manifest = export_bundle(args.workdir, args.out, data=args.data, target_recall=args.target_recall,
                             overwrite=args.overwrite, strategy=args.index, key=_key(args.sign_key_file),
                             allow_harmful=args.allow_harmful_head,
                             log=lambda message: print(message, file=sys.stderr, flush=True))
    index, evaluation = manifest["index"], manifest["eval"]
    print(f"wrote {args.out}: {manifest['head']['trained_as']} head, {manifest['corpus']['count']} documents, "
          f"ScaNN {index['strategy']} recall@10 {index['recall@10']:.4f} at {index['qps']:,.0f} QPS")
    if evaluation is not None:
        print(f"{evaluation['split']} ({evaluation['queries']} queries)  ndcg@10: base "
              f"{evaluation['base']['ndcg@10']:.4f}  head {evaluation['head']['ndcg@10']:.4f}  bundle "
              f"{evaluation['bundle']['ndcg@10']:.4f}")
    return 0


def _add_search(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="search a bundle with query embeddings (.npy) or texts (needs the encoder extra)",
        description="Searches an exported bundle (no JAX needed). Texts are encoded with the bundle's encoder and "
                    "query prompt. Output: JSON (default) or TSV `query<TAB>rank<TAB>id<TAB>score`; result slots "
                    "with no document are left out.")
    parser.add_argument("--bundle", required=True, help="a directory written by `esep-jax export`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--queries", help="query embeddings .npy [Q, d_in] (the encoder's, before the head)")
    source.add_argument("--text", action="append", help="a query text (repeat for several)")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--format", choices=("json", "tsv"), default="json")
    parser.add_argument("--key-file", default=None, metavar="PATH",
                        help="the bundle's signing key: refuse a bundle whose signature does not match")
    parser.set_defaults(handler=_run_search)


def _key(path: str | None) -> bytes | None:
    from esep_jax.export.format import read_key

    if path is None:
        return None
    try:
        return read_key(path)
    except ValueError as error:
        raise InputError(str(error)) from None


def _search_embeddings(args, manifest: dict):
    import numpy as np

    if args.queries:
        # Memory-mapped: a header that declares more data than the file holds is refused here, and a large file
        # is read a chunk at a time (by `_run_search`) rather than all at once.
        try:
            queries = np.load(args.queries, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise InputError(f"cannot read as .npy: {error}", file=args.queries) from None
        if queries.ndim not in (1, 2) or queries.dtype.kind not in "fiu":
            raise InputError(f"expected a [num_queries, dim] float array, got {queries.dtype}{list(queries.shape)}",
                             file=args.queries)
        return queries
    from esep_jax.data.encoders import EncoderNotInstalledError, encode_texts

    encoder = manifest.get("encoder", {}).get("name")
    if not encoder:
        raise InputError("the bundle records no encoder, so --text cannot be encoded; pass --queries")
    try:
        return encode_texts(args.text, encoder=encoder, prompt=manifest["encoder"].get("query_prompt") or "",
                            normalize=bool(manifest.get("normalized", True)), show_progress=False)
    except EncoderNotInstalledError as error:
        raise InputError(str(error), field="--text") from None
    except ValueError as error:
        raise InputError(str(error), field="encoder") from None


def _run_search(args) -> int:
    import json

    import numpy as np

    from esep_jax.serving import Searcher

    searcher = Searcher.load(args.bundle, key=_key(args.key_file))
    queries = _search_embeddings(args, searcher.manifest)
    queries = queries[None] if queries.ndim == 1 else queries
    parts = [searcher.search(np.asarray(queries[start:start + SEARCH_CHUNK]), args.k)
             for start in range(0, len(queries), SEARCH_CHUNK)]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, args.k), object)
    scores = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, args.k), np.float32)
    names = args.text or list(range(len(ids)))
    if args.format == "tsv":
        lines = [f"{name}\t{rank}\t{doc}\t{float(score):.6g}" for name, row, row_scores in zip(names, ids, scores)
                 for rank, (doc, score) in enumerate(zip(row, row_scores), start=1) if doc is not None]
        print("\n".join(lines))
    else:
        results = [{"query": name, "results": [{"id": doc, "score": float(score)}
                                               for doc, score in zip(row, row_scores) if doc is not None]}
                   for name, row, row_scores in zip(names, ids, scores)]
        print(json.dumps({"bundle": args.bundle, "k": args.k, "queries": results}, indent=2))
    return 0


def register(subparsers) -> None:
    """Adds this module's subcommands."""
    _add_export(subparsers)
    _add_search(subparsers)
