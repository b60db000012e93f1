"""`esep-jax bench train | search`: benchmarks reported as ratios measured in one run."""

from __future__ import annotations

import sys
from pathlib import Path

from esep_jax.cli.common import int_list
from esep_jax.errors import InputError


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (train step, ScaNN search)")
    kinds = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    train = kinds.add_parser(
        "train", help="full-corpus train step: utilisation vs plain matmuls, pairs/s, peak memory, vs PyTorch",
        description="Times the jitted full-corpus softmax train step and reports achieved FLOP/s (4·B·N·d per "
                    "step) as a fraction of plain [B,d]x[d,chunk] matmul FLOP/s measured in the same run, "
                    "pairs/s, peak memory, and the ratio to the same loss written plainly in PyTorch. "
                    "Lists are comma-separated; --grid runs N in {10k,100k,1M} x d in {384,768} x B in {1k,8k}.")
    train.add_argument("--corpus-size", type=int_list, default=[100000], help="N, e.g. 100000 or 1e4,1e5")
    train.add_argument("--dim", type=int_list, default=[384], help="d")
    train.add_argument("--batch", type=int_list, default=[4096], help="B (global batch)")
    train.add_argument("--devices", type=int_list, default=None,
                       help="device counts (CPU: JAX_NUM_CPU_DEVICES per count; default: this process's)")
    train.add_argument("--grid", action="store_true", help="the full grid of sizes")
    train.add_argument("--chunk", type=int, default=8192, help="corpus rows per scan step")
    train.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="corpus dtype")
    train.add_argument("--steps", type=int, default=2, help="timed steps (the best is kept)")
    train.add_argument("--members", type=int_list, default=[1],
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


def register(subparsers) -> None:
    """Adds this module's subcommands."""
    _add_bench(subparsers)
