"""What heads are trained to do: loss terms (one module each, registered in `registry.py`) and the blockwise,
sharded full-corpus softmax they build on (`corpus_softmax.py`)."""

from esep_jax.objectives.registry import (CORPUS, PAIRED, Term, TermInputs, build_terms, needed_signals,
                                          needed_tables, register_term, term_names)

__all__ = ["CORPUS", "PAIRED", "Term", "TermInputs", "build_terms", "needed_signals", "needed_tables",
           "register_term", "term_names"]
