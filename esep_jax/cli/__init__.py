"""The `esep-jax` command line: a thin layer over the importable modules.

Each `*_commands.py` module adds a group of subcommands. Errors a user can cause are one line on stderr:
`InputError` exits 2, `StorageError` and `TrainingError` exit 1; anything else is a bug and keeps its traceback.
Heavy imports (jax, tensorstore) happen inside the subcommands so `esep-jax --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from esep_jax.cli import bench_commands, bundle_commands, data_commands, eval_commands, train_commands
from esep_jax.cli.common import Parser
from esep_jax.errors import (EXIT_BAD_INPUT, EXIT_FAILED, InputError, StorageError, TrainingError,
                             is_storage_failure, os_reason)

COMMAND_GROUPS = (data_commands, train_commands, eval_commands, bundle_commands, bench_commands)
# The commands that accept --config.* overrides (the ones that build a config).
CONFIGURABLE = ("train", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="esep-jax",
                    description="Train searching modules <f(enc(q)), enc(d)> over frozen, precomputed embeddings.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.register(subparsers)
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


def _quiet_libraries() -> None:
    """ScaNN, orbax and absl log through Python logging and to stderr; their lines are noise around ours (set
    ESEP_VERBOSE=1 to see them). TensorFlow-style C++ logging (ScaNN) obeys TF_CPP_MIN_LOG_LEVEL."""
    if os.environ.get("ESEP_VERBOSE"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    try:
        rest, overrides = split_config_overrides(argv)
        args = build_parser().parse_args(rest)
        if overrides and args.command not in CONFIGURABLE:
            raise InputError(f"--config.* overrides apply to `train` and `sweep`, not `{args.command}`")
        args.config_overrides = overrides
        return args.handler(args)
    except InputError as error:
        print(f"esep-jax: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (StorageError, TrainingError) as error:
        print(f"esep-jax: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `esep-jax search … | head`: the reader left; say nothing more
        # Point stdout at /dev/null so the interpreter's final flush does not raise again (Python's docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ValueError) as error:
        # The one path for storage failures no module wrapped itself: a full disk, a quota, a lost mount.
        if not is_storage_failure(error):
            raise
        print(f"esep-jax: error: could not read or write a file: {os_reason(error)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("esep-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
