"""Shared pieces of the command line: the parser class and argument types."""

from __future__ import annotations

import argparse

from esep_jax.errors import InputError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `esep-jax: error: …` line and exit status 2 like any bad input."""

    def error(self, message: str):
        raise InputError(f"{message} (see `{self.prog} --help`)")


def int_list(text: str) -> list[int]:
    """`1,2,3` (and `1e5`) as integers, for comma-separated arguments."""
    try:
        return [int(float(v)) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
