"""The `esep-jax` command line: a thin layer over the importable modules.

Bad input raises `InputError`, printed here as one line with exit status 2. Heavy imports (jax, tensorstore)
happen inside the subcommands so `esep-jax --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esep_jax.errors import EXIT_BAD_INPUT, InputError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `esep-jax: error: …` line and exit status 2 like any bad input."""

    def error(self, message: str):
        raise InputError(f"{message} (see `{self.prog} --help`)")


def _add_ingest(subparsers) -> None:
    parser = subparsers.add_parser(
        "ingest", help="build a dataset from .npy embeddings + ids + qrels, or from BEIR text + an encoder",
        description="Build an esep-jax dataset (tensorstore zarr3 arrays + dataset.json). Either give "
                    "precomputed embeddings (--corpus/--corpus-ids/--queries/--query-ids) or a BEIR directory "
                    "to encode (--beir, needs the 'encoder' extra).")
    parser.add_argument("--out", required=True, help="output dataset directory (written atomically)")
    parser.add_argument("--corpus", help="corpus embeddings .npy [N, d]")
    parser.add_argument("--corpus-ids", help="corpus ids, one per line, in row order")
    parser.add_argument("--queries", help="query embeddings .npy [Q, d]")
    parser.add_argument("--query-ids", help="query ids, one per line, in row order")
    parser.add_argument("--qrels", action="append", default=[], metavar="SPLIT=PATH",
                        help="BEIR qrels TSV (query-id, corpus-id, score) or TREC qrels; repeat per split")
    parser.add_argument("--beir", help="BEIR directory with corpus.jsonl, queries.jsonl, qrels/*.tsv to encode")
    parser.add_argument("--encoder", default=None,
                        help="sentence-transformers model name or local path (default all-MiniLM-L6-v2 with "
                             "--beir); recorded in the manifest")
    parser.add_argument("--query-prompt", default="", help="text prepended to queries before encoding")
    parser.add_argument("--document-prompt", default="", help="text prepended to documents before encoding")
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
        from esep_jax.data.text_encoder import DEFAULT_ENCODER
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


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a searching module (resumes if --workdir holds a run)",
        description="Train a head on a dataset. Config: --config FILE.py (get_config() -> Config; default: "
                    "the built-in defaults) then --config.SECTION.FIELD=VALUE overrides, e.g. "
                    "--config.optim.learning_rate=3e-4. Rerunning with the same --workdir resumes.")
    parser.add_argument("--data", required=True, help="dataset directory (from `esep-jax ingest`)")
    parser.add_argument("--workdir", required=True, help="run directory: config, checkpoints, metrics.jsonl")
    parser.add_argument("--config", default=None, help="Python config file (see configs/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                        help="checkpoint and exit after step N (the run itself is unchanged; rerun to continue)")
    group = parser.add_argument_group("multi-process jobs (see launch/)")
    group.add_argument("--distributed", choices=("off", "auto", "explicit"), default=None,
                       help="auto: let JAX detect Slurm/TPU/MPI/Kubernetes; explicit: use the flags below "
                            "(default: explicit when a coordinator is set, else off)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="or ESEP_COORDINATOR")
    group.add_argument("--num-processes", type=int, default=None, help="or ESEP_NUM_PROCESSES")
    group.add_argument("--process-id", type=int, default=None, help="or ESEP_PROCESS_ID")
    group.add_argument("--heartbeat-timeout", type=int, default=30, metavar="SECONDS",
                       help="a peer silent this long is dead: the job fails instead of hanging")
    parser.set_defaults(handler=_run_train)


def _run_train(args) -> int:
    from esep_jax.config import load_config
    from esep_jax.eval.report import HEADLINE
    from esep_jax.train import distributed
    from esep_jax.train.loop import train_and_evaluate

    config = load_config(args.config, args.config_overrides)
    distributed.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id,
                           args.heartbeat_timeout)
    import jax

    summary = train_and_evaluate(config, args.data, args.workdir, progress=not args.no_progress,
                                 stop_at_step=args.stop_at_step)
    if jax.process_index() != 0:
        return 0
    print(f"dev split: {summary['dev_split']}; steps {summary['steps']}, best step {summary['best_step']}"
          + (" (stopped early)" if summary["stopped_early"] else "")
          + (" (paused: rerun the same command to resume)" if summary["interrupted"] else ""))
    print(f"{'metric':<12}{'base':>9}{'best':>9}")
    for name in HEADLINE:
        print(f"{name:<12}{summary['base_dev'][name]:>9.4f}{summary['best_dev'][name]:>9.4f}")
    return 0


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="exact retrieval metrics (trec_eval conventions), base and trained head side by side")
    parser.add_argument("--data", required=True, help="dataset directory")
    parser.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    parser.add_argument("--workdir", default=None, help="a training run; evaluates its best head")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all metrics as JSON")
    parser.add_argument("--run", dest="run_file", default=None, metavar="PATH", help="write the TREC run file")
    parser.add_argument("--dims", type=_int_list, default=None, metavar="K,K,...",
                        help="also evaluate against the index truncated to these prefix sizes (default: a "
                             "Matryoshka run's loss.matryoshka_dims)")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    from esep_jax.eval.report import evaluate_split, format_table, write_json

    result = evaluate_split(args.data, args.split, workdir=args.workdir, run_path=args.run_file,
                            prefix_dims=args.dims)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def _add_sweep(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="grid/random search mapped onto ensemble members; leaderboard (md, csv) and PNG plots",
        description="Runs the sweep a file's get_sweep() describes (see esep_jax/sweep.py and "
                    "configs/sweep_nfcorpus.py): per-member hyperparameters share one compiled ensemble, other "
                    "choices form groups. Writes WORKDIR/leaderboard.{md,csv,json}, dev_curves.png and "
                    "hyperparameters.png.")
    parser.add_argument("--config", required=True, help="sweep file: get_config() and get_sweep()")
    parser.add_argument("--data", required=True, help="dataset directory")
    parser.add_argument("--workdir", required=True, help="sweep directory (one group-NN run per group)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_run_sweep)


def _run_sweep(args) -> int:
    from esep_jax.sweep import run_sweep

    rows = run_sweep(args.config, args.data, args.workdir, args.config_overrides, progress=not args.no_progress)
    print((Path(args.workdir) / "leaderboard.md").read_text(), end="")
    print(f"best dev member: group {rows[0]['group']} member {rows[0]['member']}; "
          f"plots in {args.workdir}/dev_curves.png, {args.workdir}/hyperparameters.png")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(float(v)) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (train step, ScaNN search)")
    kinds = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    train = kinds.add_parser(
        "train", help="full-corpus train step: utilisation vs plain matmuls, pairs/s, peak memory, vs PyTorch",
        description="Times the jitted full-corpus softmax train step and reports achieved FLOP/s (4·B·N·d per "
                    "step) as a fraction of plain [B,d]x[d,chunk] matmul FLOP/s measured in the same run, "
                    "pairs/s, peak memory, and the ratio to the same loss written plainly in PyTorch. "
                    "Lists are comma-separated; --grid runs N in {10k,100k,1M} x d in {384,768} x B in {1k,8k}.")
    train.add_argument("--corpus-size", type=_int_list, default=[100000], help="N, e.g. 100000 or 1e4,1e5")
    train.add_argument("--dim", type=_int_list, default=[384], help="d")
    train.add_argument("--batch", type=_int_list, default=[4096], help="B (global batch)")
    train.add_argument("--devices", type=_int_list, default=None,
                       help="device counts (CPU: JAX_NUM_CPU_DEVICES per count; default: this process's)")
    train.add_argument("--grid", action="store_true", help="the full grid of sizes")
    train.add_argument("--chunk", type=int, default=8192, help="corpus rows per scan step")
    train.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="corpus dtype")
    train.add_argument("--steps", type=int, default=2, help="timed steps (the best is kept)")
    train.add_argument("--members", type=_int_list, default=[1],
                       help="ensemble sizes, e.g. 1,16: per-member cost of an ensemble vs one head")
    train.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    train.add_argument("--json", default=None, metavar="PATH")
    train.add_argument("--markdown", default=None, metavar="PATH")
    train.add_argument("--plot", default=None, metavar="PATH", help="PNG")
    train.set_defaults(handler=_run_bench_train)
    _add_bench_search(kinds)


def _run_bench_train(args) -> int:
    import jax

    from esep_jax.bench.report import markdown_table, write_results
    from esep_jax.bench.train import run_benchmarks

    sizes, dims, batches = ([10000, 100000, 1000000], [384, 768], [1024, 8192]) if args.grid else \
        (args.corpus_size, args.dim, args.batch)
    records = run_benchmarks(sizes, dims, batches, args.devices or [jax.device_count()], chunk=args.chunk,
                             dtype=args.dtype, steps=args.steps, torch=not args.no_torch, members=args.members,
                             progress=lambda r: print(markdown_table([r]).splitlines()[-1], flush=True))
    print(markdown_table(records))
    write_results(records, args.json, args.markdown, args.plot)
    return 0


def _add_bench_search(kinds) -> None:
    search = kinds.add_parser(
        "search", help="ScaNN as exported in bundles: recall@10 and QPS vs exact brute-force search",
        description="Builds the ScaNN index `esep-jax export` would build for the corpus (same size rules, same "
                    "tuner), tunes it to --target-recall on half the queries and reports recall@10 and QPS on the "
                    "other half, next to exact search (BLAS matmul + argpartition). Data: synthetic clustered "
                    "unit vectors, or --data DIR for a dataset's corpus and queries.")
    search.add_argument("--corpus-size", type=lambda v: int(float(v)), default=100000, help="N (synthetic)")
    search.add_argument("--dim", type=int, default=384, help="d (synthetic)")
    search.add_argument("--queries", type=int, default=1000, help="queries (half tune, half measure)")
    search.add_argument("--data", default=None, help="an esep-jax dataset instead of synthetic data")
    search.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to tune for")
    search.add_argument("--index", choices=("auto", "brute_force", "ah", "tree"), default="auto",
                        help="index strategy (auto: by corpus size, as export does)")
    search.add_argument("--seed", type=int, default=0, help="synthetic data / query sampling seed")
    search.add_argument("--json", default=None, metavar="PATH")
    search.add_argument("--markdown", default=None, metavar="PATH")
    search.set_defaults(handler=_run_bench_search)


def _run_bench_search(args) -> int:
    from esep_jax.bench.search import (dataset_embeddings, markdown_table, run_search_benchmark,
                                       synthetic_embeddings, write_results)

    if args.queries < 2 or args.corpus_size < 10 or args.dim < 1:
        raise InputError("need --queries >= 2, --corpus-size >= 10 and --dim >= 1")
    if args.data:
        corpus, queries, normalized = dataset_embeddings(args.data, args.queries, args.seed)
    else:
        corpus, queries = synthetic_embeddings(args.corpus_size, args.queries, args.dim, seed=args.seed)
        normalized = True
    record = run_search_benchmark(corpus, queries, normalized=normalized, target_recall=args.target_recall,
                                  strategy=args.index, data=args.data or "synthetic",
                                  log=lambda message: print(message, file=sys.stderr, flush=True))
    print(markdown_table([record]), end="")
    write_results(record, args.json, args.markdown)
    return 0


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
    parser.set_defaults(handler=_run_export)


def _run_export(args) -> int:
    from esep_jax.export.bundle import export_bundle

    manifest = export_bundle(args.workdir, args.out, data=args.data, target_recall=args.target_recall,
                             overwrite=args.overwrite, strategy=args.index,
                             log=lambda message: print(message, file=sys.stderr, flush=True))
    index, evaluation = manifest["index"], manifest["eval"]
    print(f"wrote {args.out}: {manifest['head']['trained_as']} head, {manifest['corpus']['count']} documents, "
          f"ScaNN {index['strategy']} recall@10 {index['recall@10']:.4f} at {index['qps']:,.0f} QPS")
    print(f"{evaluation['split']} ({evaluation['queries']} queries)  ndcg@10: base {evaluation['base']['ndcg@10']:.4f}"
          f"  head {evaluation['head']['ndcg@10']:.4f}  bundle {evaluation['bundle']['ndcg@10']:.4f}")
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
    parser.set_defaults(handler=_run_search)


def _search_embeddings(args, manifest: dict):
    import numpy as np

    if args.queries:
        try:
            return np.load(args.queries, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise InputError(f"cannot read as .npy: {error}", file=args.queries) from None
    from esep_jax.data.text_encoder import EncoderNotInstalledError, encode_texts

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

    from esep_jax.serving import Searcher

    searcher = Searcher.load(args.bundle)
    ids, scores = searcher.search(_search_embeddings(args, searcher.manifest), args.k)
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
    from esep_jax.mining import mine_negatives

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


def _add_drift(subparsers) -> None:
    parser = subparsers.add_parser(
        "drift", help="query drift: retention of closed-form maps and trained heads (B's queries, A's index)",
        description="On a drift dataset (A's corpus, B's queries; optionally A's query embeddings via "
                    "--query-targets at ingest), fit the closed-form maps (mean shift, Procrustes, ridge) and "
                    "report nDCG@10 and retention = metric / B native for them and for trained runs.")
    parser.add_argument("--data", required=True, help="drift dataset directory")
    parser.add_argument("--split", default="test", help="split to report (default: test)")
    parser.add_argument("--corpus-b", default=None, metavar="NPY",
                        help="B's corpus embeddings in the dataset's corpus row order (for B native and retention)")
    parser.add_argument("--workdir", action="append", default=[], metavar="RUN",
                        help="a trained run to add to the report (repeatable)")
    parser.add_argument("--train", default="train", help="split the closed-form maps are fitted on")
    parser.add_argument("--dev", default="dev", help="split the ridge alpha is chosen on")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    parser.set_defaults(handler=_run_drift)


def _run_drift(args) -> int:
    import json

    from esep_jax import drift
    from esep_jax.atomic import atomic_write_text

    try:
        rows = drift.run(args.data, args.split, corpus_b=args.corpus_b, workdirs=args.workdir, train=args.train,
                         dev=args.dev, log=lambda message: print(message, file=sys.stderr))
    except (ValueError, OSError, EOFError) as error:  # B's corpus: missing, not an array, or the wrong shape
        raise InputError(str(error), file=args.corpus_b) from None
    print(drift.markdown_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="esep-jax",
        description="Train searching modules <f(enc(q)), enc(d)> over frozen, precomputed embeddings.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_ingest, _add_mix, _add_train, _add_eval, _add_sweep, _add_mine, _add_teacher, _add_drift,
                _add_export, _add_search, _add_bench):
        add(subparsers)
    return parser


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise InputError(f"{arg} needs a value")
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_config_overrides(argv)
        args = build_parser().parse_args(rest)
        if overrides and args.command not in ("train", "sweep"):
            raise InputError(f"--config.* overrides apply to `train`, not `{args.command}`")
        args.config_overrides = overrides
        return args.handler(args)
    except InputError as error:
        print(f"esep-jax: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FloatingPointError, RuntimeError) as error:
        from esep_jax.export.bundle import BundleWriteError
        from esep_jax.train.checkpoint import CheckpointRestoreError, CheckpointWriteError

        if not isinstance(error, (FloatingPointError, CheckpointWriteError, CheckpointRestoreError,
                                  BundleWriteError)):
            raise
        print(f"esep-jax: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("esep-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
