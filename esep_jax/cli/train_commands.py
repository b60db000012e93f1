"""`esep-jax train | sweep`: the commands that train (the only ones that import the training loop)."""

from __future__ import annotations

import sys
from pathlib import Path



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
    from esep_jax.training import distributed
    from esep_jax.training.loop import train_and_evaluate

    config = load_config(args.config, args.config_overrides)
    distributed.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id,
                           args.heartbeat_timeout)
    import jax

    summary = train_and_evaluate(config, args.data, args.workdir, progress=not args.no_progress,
                                 stop_at_step=args.stop_at_step)
    if jax.process_index() != 0:
        return 0
    out, err = report_lines(summary)
    print("\n".join(out))
    for line in err:
        print(line, file=sys.stderr)
    return 0


def report_lines(summary: dict) -> tuple[list[str], list[str]]:
    """(stdout lines, stderr lines) that `esep-jax train` prints for a run's summary."""
    out, err = [], []
    out.append(f"dev split: {summary['dev_split']}; steps {summary['steps']}, best step {summary['best_step']}"
               + (" (stopped early)" if summary["stopped_early"] else "")
               + (" (paused: rerun the same command to resume)" if summary["interrupted"] else ""))
    out.append(f"{'metric':<12}{'base':>9}{'best':>9}")
    for name in HEADLINE:
        out.append(f"{name:<12}{summary['base_dev'][name]:>9.4f}{summary['best_dev'][name]:>9.4f}")
    base_view, head_view = summary["base_dev"].get("new_documents"), summary["best_dev"].get("new_documents")
    if base_view and head_view:
        out.append(f"{'ndcg@10':<12}{base_view['ndcg@10']:>9.4f}{head_view['ndcg@10']:>9.4f}   new documents: "
                   f"{base_view['queries']} dev queries, counting only relevant documents never training positives")
    if summary.get("members", 1) > 1:
        out.append(f"{'member':<8}{'dev ndcg@10':>12}{'best step':>11}{'weight':>8}")
        steps = summary["best_step"] if isinstance(summary["best_step"], list) else [summary["best_step"]]
        for member, (dev, step, weight) in enumerate(zip(summary["member_dev"], steps, summary["weights"])):
            out.append(f"{member:<8}{dev['ndcg@10']:>12.4f}{step:>11}{weight:>8.3f}")
    if summary.get("gate"):
        out.append(f"in-domain gate: {summary['gate']['anchors']} training queries as anchors; dev queries get "
                   f"{100 * summary['gate']['mean_on_dev']:.1f} % of the head")
    if summary.get("harmful"):
        harm = summary["harm_test"]
        err.append(f"esep-jax: WARNING: the head is worse than the base embeddings on documents it never saw as "
                   f"positives (new-documents dev view: {harm['mean_delta']:+.4f} nDCG@10 over {harm['queries']} "
                   f"queries, t = {harm['t']:.2f}): it would push down documents added after training. "
                   "`esep-jax export` refuses it unless --allow-harmful-head.")
    return out, err


HEADLINE = ("ndcg@10", "mrr@10", "recall@100", "map@100")


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
    from esep_jax.training.sweep import run_sweep

    rows = run_sweep(args.config, args.data, args.workdir, args.config_overrides, progress=not args.no_progress)
    print((Path(args.workdir) / "leaderboard.md").read_text(), end="")
    print(f"best dev member: group {rows[0]['group']} member {rows[0]['member']}; "
          f"plots in {args.workdir}/dev_curves.png, {args.workdir}/hyperparameters.png")
    return 0


def register(subparsers) -> None:
    """Adds this module's subcommands."""
    _add_train(subparsers)
    _add_sweep(subparsers)
