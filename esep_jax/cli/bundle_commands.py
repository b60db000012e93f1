"""`esep-jax export | search | serve`: serving bundles."""

from __future__ import annotations

import sys

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
    parser.add_argument("--corpus-text", default=None, metavar="CORPUS.jsonl",
                        help="the documents' texts (BEIR corpus.jsonl[.gz], exactly the dataset's corpus ids): "
                             "stored in the bundle so search and serve return each hit's title and text")
    parser.add_argument("--bm25", action="store_true",
                        help="also build a BM25 index over --corpus-text (bm25s, English stopwords, PyStemmer) "
                             "for hybrid dense + BM25 search (needs the hybrid extra)")
    parser.set_defaults(handler=_run_export)


def _run_export(args) -> int:
    from esep_jax.export.bundle import export_bundle

    manifest = export_bundle(args.workdir, args.out, data=args.data, target_recall=args.target_recall,
                             overwrite=args.overwrite, strategy=args.index, key=_key(args.sign_key_file),
                             allow_harmful=args.allow_harmful_head, corpus_text=args.corpus_text, bm25=args.bm25,
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
                    "query prompt. Output: JSON (default), TSV `query<TAB>rank<TAB>id<TAB>score`, or a TREC run "
                    "`qid Q0 docid rank score tag`; result slots with no document are left out. --hybrid fuses "
                    "the dense results with the bundle's BM25 index by reciprocal-rank fusion.")
    parser.add_argument("--bundle", required=True, help="a directory written by `esep-jax export`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--queries", help="query embeddings .npy [Q, d_in] (the encoder's, before the head)")
    source.add_argument("--text", action="append", help="a query text (repeat for several)")
    source.add_argument("--query-file", default=None, metavar="QUERIES.jsonl",
                        help="query texts and ids from a BEIR queries.jsonl[.gz]")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--format", choices=("json", "tsv", "trec"), default="json")
    parser.add_argument("--with-documents", action="store_true",
                        help="add each hit's title and text (JSON output; the bundle must store documents)")
    system = parser.add_mutually_exclusive_group()
    system.add_argument("--hybrid", action="store_true",
                        help="fuse dense and BM25 results by RRF (texts only; a bundle exported with --bm25)")
    system.add_argument("--bm25-only", action="store_true", help="BM25 alone (texts only; no encoder needed)")
    parser.add_argument("--rrf-k", type=float, default=60.0, help="RRF's k: score = sum of w / (k + rank)")
    parser.add_argument("--dense-weight", type=float, default=1.0, help="the dense list's RRF weight")
    parser.add_argument("--bm25-weight", type=float, default=1.0, help="the BM25 list's RRF weight")
    parser.add_argument("--fusion-depth", type=int, default=100, help="results of each list that are fused")
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


def _query_texts(args) -> tuple[list[str] | None, list]:
    """(query texts or None, the name of each query in the output)."""
    if args.query_file:
        from esep_jax.data.beir import read_beir_queries

        ids, texts, _ = read_beir_queries(args.query_file)
        return texts, ids
    if args.text:
        return args.text, args.text
    return None, []


def _search_embeddings(args, manifest: dict, texts: list[str] | None):
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
        return encode_texts(texts, encoder=encoder, prompt=manifest["encoder"].get("query_prompt") or "",
                            normalize=bool(manifest.get("normalized", True)), show_progress=False)
    except EncoderNotInstalledError as error:
        raise InputError(str(error), field="--text") from None
    except ValueError as error:
        raise InputError(str(error), field="encoder") from None


def _search_chunks(args, searcher, texts):
    """(rows, scores) of every query, searched SEARCH_CHUNK at a time."""
    import numpy as np

    from esep_jax.serving import Fusion

    if (args.hybrid or args.bm25_only) and texts is None:
        raise InputError("needs query texts (--text or --query-file) for BM25", field="--hybrid/--bm25-only")
    if args.bm25_only:
        return searcher.search_bm25_rows(texts, args.k)
    fusion = Fusion(args.rrf_k, args.dense_weight, args.bm25_weight, args.fusion_depth) if args.hybrid else None
    queries = _search_embeddings(args, searcher.manifest, texts)
    queries = queries[None] if queries.ndim == 1 else queries
    parts = [searcher.search_rows(np.asarray(queries[start:start + SEARCH_CHUNK]), args.k, hybrid=fusion,
                                  query_texts=None if texts is None else texts[start:start + SEARCH_CHUNK])
             for start in range(0, len(queries), SEARCH_CHUNK)]
    rows = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, args.k), np.int64)
    scores = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, args.k), np.float32)
    return rows, scores


def _run_search(args) -> int:
    import json

    from esep_jax.serving import Searcher

    searcher = Searcher.load(args.bundle, key=_key(args.key_file))
    if args.with_documents and not searcher.has_documents:
        raise InputError("the bundle stores no documents (export it with --corpus-text)", field="--with-documents")
    texts, names = _query_texts(args)
    rows, scores = _search_chunks(args, searcher, texts)
    names = names or list(range(len(rows)))
    hits = [[(searcher.ids[row], float(score)) for row, score in zip(row_list, score_list) if row >= 0]
            for row_list, score_list in zip(rows.tolist(), scores.tolist())]
    if args.format == "tsv":
        print("\n".join(f"{name}\t{rank}\t{doc}\t{score:.6g}" for name, query_hits in zip(names, hits)
                        for rank, (doc, score) in enumerate(query_hits, start=1)))
    elif args.format == "trec":
        tag = "esep_jax-" + ("hybrid" if args.hybrid else "bm25" if args.bm25_only else "dense")
        print("\n".join(f"{str(name).replace(' ', '_')} Q0 {doc} {rank} {score:.9g} {tag}"
                        for name, query_hits in zip(names, hits)
                        for rank, (doc, score) in enumerate(query_hits, start=1)))
    else:
        documents = searcher.documents(rows) if args.with_documents else None
        results = []
        for q, (name, query_hits) in enumerate(zip(names, hits)):
            entries = [{"id": doc, "score": score} for doc, score in query_hits]
            if documents is not None:  # the hits are the row's first len(query_hits) slots (missing ones trail)
                for slot, entry in enumerate(entries):
                    entry["document"] = documents[q * rows.shape[1] + slot]
            results.append({"query": name, "results": entries})
        print(json.dumps({"bundle": args.bundle, "k": args.k, "queries": results}, indent=2))
    return 0


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="an HTTP search service over a bundle (JSON; needs the serve extra)",
        description="Serves a bundle over HTTP (FastAPI + uvicorn, no JAX): POST /search with query texts or "
                    "vectors, k, and optional hybrid (dense + BM25 by RRF); GET /health (liveness) and /ready "
                    "(the bundle loaded, checksums verified). Bad requests get 4xx JSON errors. Stops on "
                    "SIGINT/SIGTERM.")
    parser.add_argument("--bundle", required=True, help="a directory written by `esep-jax export`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed)")
    parser.add_argument("--key-file", default=None, metavar="PATH",
                        help="the bundle's signing key: refuse a bundle whose signature does not match")
    parser.add_argument("--max-batch", type=int, default=256, help="queries per request at most (default 256)")
    parser.add_argument("--max-k", type=int, default=1000, help="k at most (default 1000)")
    parser.add_argument("--max-body-mib", type=float, default=8.0, help="request body size limit (default 8 MiB)")
    parser.add_argument("--access-log", action="store_true", help="log every request to stdout")
    parser.set_defaults(handler=_run_serve)


def _run_serve(args) -> int:
    try:
        from esep_jax.serving.server import Limits, serve
    except ImportError as error:
        raise InputError(f"serving over HTTP needs fastapi and uvicorn: pip install 'esep-jax[serve]' ({error})") \
            from None
    if args.max_batch < 1 or args.max_k < 1 or args.max_body_mib <= 0 or not 0 <= args.port <= 65535:
        raise InputError("need --max-batch >= 1, --max-k >= 1, --max-body-mib > 0 and 0 <= --port <= 65535")
    limits = Limits(max_batch=args.max_batch, max_k=args.max_k, max_body_bytes=int(args.max_body_mib * 2**20))
    serve(args.bundle, args.host, args.port, key=_key(args.key_file), limits=limits, access_log=args.access_log,
          announce=lambda line: print(line, flush=True))
    return 0


def register(subparsers) -> None:
    """Adds this module's subcommands."""
    _add_export(subparsers)
    _add_search(subparsers)
    _add_serve(subparsers)
