"""`esep-jax bench train | search | serve`: benchmarks reported as ratios measured in one run."""

from __future__ import annotations

import sys

from esep_jax.cli.common import int_list
from esep_jax.errors import InputError


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (train step, ScaNN search, HTTP serving)")
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
    train.add_argument("--epoch-queries", type=int, default=None, metavar="Q",
                       help="also estimate one epoch over Q training queries (MS MARCO: 502939) from the step")
    train.add_argument("--json", default=None, metavar="PATH")
    train.add_argument("--markdown", default=None, metavar="PATH")
    train.add_argument("--plot", default=None, metavar="PATH", help="PNG")
    train.set_defaults(handler=_run_bench_train)
    _add_bench_search(kinds)
    _add_bench_serve(kinds)
    _add_bench_end_to_end(kinds)


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
    if args.epoch_queries:
        for record in records:
            record["epoch_s"] = record["step_s"] * -(-args.epoch_queries // record["batch"])
            print(f"N={record['corpus_size']:,} d={record['dim']} B={record['batch']:,} {record['dtype']}: one epoch "
                  f"over {args.epoch_queries:,} queries ≈ {record['epoch_s']:.1f} s on {record['device_kind']} "
                  f"(utilisation {record['utilization']:.2f} of this device's matmul peak)")
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


def _add_bench_serve(kinds) -> None:
    serve = kinds.add_parser(
        "serve", help="load test of `esep-jax serve` on loopback: QPS and p50/p99 latency",
        description="Starts `esep-jax serve` on the bundle on a free 127.0.0.1 port (or uses --port), waits for "
                    "/ready, and per scenario (text or vector queries, single or batch, dense or hybrid) sends at "
                    "most --requests requests for at most --duration seconds from --concurrency clients; reports "
                    "requests/s, queries/s and p50/p99 latency, then stops the server.")
    serve.add_argument("--bundle", required=True, help="a bundle (ideally with --corpus-text and --bm25)")
    serve.add_argument("--port", type=int, default=None, help="an esep-jax serve already on 127.0.0.1:PORT")
    serve.add_argument("--requests", type=int, default=200, help="requests per scenario at most (default 200)")
    serve.add_argument("--duration", type=float, default=20.0, help="seconds per scenario at most (default 20)")
    serve.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    serve.add_argument("--batch", type=int, default=16, help="queries per batch request (default 16)")
    serve.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    serve.add_argument("--query-file", default=None, metavar="QUERIES.jsonl",
                       help="query texts (BEIR queries.jsonl; default: words of the bundle's documents)")
    serve.add_argument("--with-documents", action="store_true", help="ask for the documents in every response")
    serve.add_argument("--key-file", default=None, metavar="PATH", help="the bundle's signing key")
    serve.add_argument("--json", default=None, metavar="PATH")
    serve.add_argument("--markdown", default=None, metavar="PATH")
    serve.set_defaults(handler=_run_bench_serve)


def _run_bench_serve(args) -> int:
    try:
        from esep_jax.bench.serve import markdown_table, run_serve_benchmark, write_results
        import httpx  # noqa: F401 - the client
    except ImportError as error:
        raise InputError(f"bench serve needs httpx, fastapi and uvicorn: pip install 'esep-jax[serve]' ({error})") \
            from None
    record = run_serve_benchmark(args.bundle, port=args.port, requests=args.requests, duration_s=args.duration,
                                 concurrency=args.concurrency, batch=args.batch, k=args.k, query_file=args.query_file,
                                 key_file=args.key_file, documents=args.with_documents,
                                 log=lambda message: print(message, file=sys.stderr, flush=True))
    print(markdown_table(record), end="")
    write_results(record, args.json, args.markdown)
    return 0


def _add_bench_end_to_end(kinds) -> None:
    head = kinds.add_parser(
        "time-to-head", help="end to end: `esep-jax train` vs the plain PyTorch loop of the same head",
        description="Trains the default head with `esep-jax train` and the same recipe as a plain PyTorch loop "
                    "(esep_jax/bench/torch_loop.py), each in a fresh process (start-up counts), in alternation "
                    "for --rounds rounds; reports the best wall time of each, the dev nDCG@10 each reached, the "
                    "speed-up and where esep_jax's time went.")
    head.add_argument("--data", required=True, help="an ingested dataset with train and dev splits")
    head.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    head.add_argument("--json", default=None, metavar="PATH")
    head.set_defaults(handler=_run_time_to_head)
    host = kinds.add_parser(
        "host", help="host time (batch assembly and placement) against device time (the step) per step",
        description="The real loader and jitted step on a dataset at --batch queries per step: mean seconds per "
                    "step spent by the host making and placing the batch, and by the device on the step, each "
                    "synchronised and timed on its own.")
    host.add_argument("--data", required=True, help="an ingested dataset")
    host.add_argument("--batch", type=int, default=65536, help="queries per step (default 65536)")
    host.add_argument("--steps", type=int, default=5, help="timed steps after one that compiles (default 5)")
    host.add_argument("--json", default=None, metavar="PATH")
    host.set_defaults(handler=_run_bench_host)
    scale = kinds.add_parser(
        "scale", help="an MS MARCO-sized synthetic corpus: ingest, one timed step, one exact evaluation, peak memory",
        description="Writes a synthetic dataset of --corpus-size x --dim bfloat16 unit vectors block by block "
                    "(never whole in memory), then places it on the devices shard by shard and times one train "
                    "step (compiled ahead of time) and one exact evaluation, with the peak memory. Split the "
                    "CPU into devices (JAX_NUM_CPU_DEVICES) so no single corpus shard passes through the host "
                    "whole.")
    scale.add_argument("--out", required=True, help="the synthetic dataset's directory (kept: --reuse)")
    scale.add_argument("--corpus-size", type=lambda v: int(float(v)), default=8_800_000)
    scale.add_argument("--dim", type=int, default=768)
    scale.add_argument("--queries", type=int, default=20_000, help="synthetic queries (train 90 %%, test 10 %%)")
    scale.add_argument("--batch", type=int, default=8192)
    scale.add_argument("--corpus-shards", type=int, default=None, help="default: every device")
    scale.add_argument("--reuse", action="store_true", help="measure an existing --out instead of writing it")
    scale.add_argument("--json", default=None, metavar="PATH")
    scale.set_defaults(handler=_run_bench_scale)


def _run_time_to_head(args) -> int:
    import json

    from esep_jax.atomic import atomic_write_text
    from esep_jax.bench.end_to_end import time_to_head

    result = time_to_head(args.data, rounds=args.rounds)
    ours, theirs = result["esep_jax"], result["pytorch"]
    print(f"{'trainer':<10}{'wall s':>9}{'dev ndcg@10':>13}{'best step':>11}")
    print(f"{'esep-jax':<10}{ours['wall_s']:>9.1f}{ours['dev_ndcg@10']:>13.4f}{ours['best_step']!s:>11}")
    print(f"{'pytorch':<10}{theirs['wall_s']:>9.1f}{theirs['dev_ndcg@10']:>13.4f}{theirs['best_step']!s:>11}")
    print(f"speed-up {result['speedup']:.2f}x; esep-jax's time: "
          + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in ours["timings"].items()))
    reached = result["pytorch_s_to_equal_dev"]
    print("pytorch never reached esep-jax's dev nDCG@10" if reached is None else
          f"pytorch first reached esep-jax's dev nDCG@10 after {reached:.1f} s")
    print(f"esep-jax sooner for a head of equal or better dev: {'yes' if result['sooner_for_equal_dev'] else 'no'}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


def _run_bench_host(args) -> int:
    import json

    from esep_jax.atomic import atomic_write_text
    from esep_jax.bench.end_to_end import host_and_device

    result = host_and_device(args.data, args.batch, args.steps)
    print(f"batch {result['batch']}: host {1000 * result['host_s']:.1f} ms, device {1000 * result['device_s']:.1f} "
          f"ms per step; host = {100 * result['host_fraction']:.1f} % of the step ({result['backend']})")
    print(f"pipelined as in training: {1000 * result['pipeline_s']:.1f} ms per step, "
          f"{100 * result['pipeline_overhead']:+.1f} % against the device alone")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


def _run_bench_scale(args) -> int:
    import json

    import jax

    from esep_jax.atomic import atomic_write_text
    from esep_jax.bench.scale import run_scale

    record = run_scale(args.out, args.corpus_size, args.dim, args.queries, args.batch,
                       args.corpus_shards or jax.device_count(), args.reuse,
                       log=lambda message: print(message, file=sys.stderr, flush=True))
    gib = 1 << 30
    print(f"{record['documents']:,} x {record['dim']} bfloat16 ({record['corpus_bytes'] / gib:.1f} GiB) on "
          f"{record['devices']} devices: step at B={record['batch']:,} {record['step_s']:.1f} s "
          f"({record['achieved_flops'] / 1e9:.0f} GFLOP/s), exact evaluation of {record['eval_queries']} queries "
          f"{record['eval_s']:.1f} s, peak memory {record['peak_rss_bytes'] / gib:.1f} GiB")
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")
    return 0


def register(subparsers) -> None:
    """Adds this module's subcommands."""
    _add_bench(subparsers)
