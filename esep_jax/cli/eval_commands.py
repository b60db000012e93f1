"""`esep-jax eval | drift`: read-only reports on datasets and trained runs."""

from __future__ import annotations

import sys

from esep_jax.cli.common import int_list
from esep_jax.errors import InputError


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="exact retrieval metrics (trec_eval conventions), base and trained head side by side",
        description="Exact retrieval on one split, the base embeddings and (with --workdir) a run's head side by "
                    "side, with the views that show a document prior: new documents (a dataset made by `esep-jax "
                    "new-documents`) and relevant documents never relevant in train. Give --data several times "
                    "for one table over datasets: the run's own data (in-domain) and others embedded by the same "
                    "encoder (zero-shot). Reads only; writes nothing but --json and --run.")
    parser.add_argument("--data", required=True, action="append",
                        help="dataset directory; repeat for a table over several (zero-shot) datasets")
    parser.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    parser.add_argument("--workdir", default=None, help="a training run; evaluates its best head")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all metrics as JSON")
    parser.add_argument("--run", dest="run_file", default=None, metavar="PATH", help="write the TREC run file")
    parser.add_argument("--dims", type=int_list, default=None, metavar="K,K,...",
                        help="also evaluate against the index truncated to these prefix sizes (default: a "
                             "Matryoshka run's loss.matryoshka_dims)")
    parser.add_argument("--fuse", default=None, metavar="RUN.trec",
                        help="also report this TREC run (e.g. BM25) alone and fused with the evaluated system by "
                             "reciprocal-rank fusion")
    parser.add_argument("--fuse-weight", type=float, default=1.0, help="the --fuse run's RRF weight (system: 1)")
    parser.add_argument("--fuse-k", type=float, default=60.0, help="RRF's k: score = sum of w / (k + rank)")
    parser.add_argument("--fuse-depth", type=int, default=100, help="results of each run that are fused")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    from esep_jax.evaluation.report import evaluate_targets, format_report, format_table, write_json

    if len(args.data) > 1 and args.run_file:
        raise InputError("--run writes one dataset's run: give one --data", field="--run")
    if len(args.data) > 1 and args.fuse:
        raise InputError("a run file belongs to one dataset: give one --data", field="--fuse")
    fusion = {"fuse": args.fuse, "fuse_weight": args.fuse_weight, "fuse_k": args.fuse_k,
              "fuse_depth": args.fuse_depth} if args.fuse else {}
    results = evaluate_targets(args.data, args.split, workdir=args.workdir, run_path=args.run_file,
                               prefix_dims=args.dims, **fusion)
    print(format_table(results[0]) if len(results) == 1 else format_report(results))
    if args.json:
        write_json(results[0] if len(results) == 1 else {"results": results}, args.json)
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

    from esep_jax.evaluation import drift
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


def register(subparsers) -> None:
    """Adds this module's subcommands."""
    _add_eval(subparsers)
    _add_drift(subparsers)
