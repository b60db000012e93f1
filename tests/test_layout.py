"""The package's shape: stages import only downwards, the training loop only from the train entry points,
registries that agree with the config schema, and modules of one responsibility."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from esep_jax.config import LossConfig, ModelConfig

PACKAGE = Path(__file__).resolve().parents[1] / "esep_jax"
# Lower first; a module may import its own stage and any stage before it (esep_jax/__init__.py lists them).
STAGES = [("errors", "atomic", "config"), ("data",), ("heads",), ("objectives",), ("runs",), ("evaluation",),
          ("training",), ("export", "serving"), ("bench",), ("cli",)]
RANK = {name: rank for rank, names in enumerate(STAGES) for name in names}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("esep_jax"):
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("esep_jax"):
                    yield node.lineno, alias.name


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_belongs_to_a_stage():
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        name = relative.parts[0].removesuffix(".py")
        if name in ("__init__", "__main__", "demo_data"):
            continue
        assert name in RANK, f"{relative}: not in a stage (see esep_jax/__init__.py)"


def test_no_upward_imports_between_stages():
    for path in PACKAGE.rglob("*.py"):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own not in RANK:
            continue
        for line, module in _imports(path):
            target = _stage(module)
            if target in RANK:
                # export/serving share a rank: serving reads bundles that export writes (serving must stay JAX-free)
                assert RANK[target] <= RANK[own], f"{path}:{line} {own} imports {module} (a later stage)"


def test_only_the_training_entry_points_import_the_training_loop():
    allowed = {PACKAGE / "cli" / "train_commands.py", PACKAGE / "training" / "sweep.py"}
    for path in PACKAGE.rglob("*.py"):
        for line, module in _imports(path):
            if module == "esep_jax.training.loop":
                assert path in allowed, f"{path}:{line} imports the training loop"


def test_serving_stays_jax_free():
    for path in (PACKAGE / "serving").rglob("*.py"):
        for line, module in _imports(path):
            assert _stage(module) in ("errors", "export", "serving", "data") and module != "esep_jax.export.bundle", (
                f"{path}:{line} imports {module}")
            if _stage(module) == "data":
                assert module in ("esep_jax.data.encoders",), f"{path}:{line} imports {module}"


def test_modules_stay_one_responsibility_sized():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().count("\n")
        assert lines <= 450, f"{path.relative_to(PACKAGE)} has {lines} lines"


def test_the_head_registry_matches_the_config_choices():
    from esep_jax.heads import head_names

    assert head_names() == tuple(sorted(typing.get_args(typing.get_type_hints(ModelConfig)["head"])))


def test_every_task_loss_choice_has_a_term():
    from esep_jax.objectives import term_names

    assert set(typing.get_args(typing.get_type_hints(LossConfig)["kind"])) <= set(term_names())


def test_importing_one_term_module_first_does_not_hide_the_others():
    """Regression: discovery used to stop when any term had registered, so a module imported directly (a test,
    a study) left the others, such as recovery, silently unregistered."""
    import subprocess
    import sys

    code = ("import esep_jax.objectives.distillation\nfrom esep_jax.config import Config\n"
            "from esep_jax.objectives import build_terms\nprint(sorted(t.name for t in build_terms(Config())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['recovery', 'task_loss']"


@pytest.mark.parametrize("module", ["esep_jax.cli", "esep_jax.serving"])
def test_light_entry_points_do_not_import_jax(module):
    import subprocess
    import sys

    code = f"import sys, {module}\nprint('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
