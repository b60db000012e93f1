"""The bundled demo dataset: ingestible as launch/demo.sh does it, and its splits hold what they promise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esep_jax.cli import main
from esep_jax.data.dataset import Dataset

DEMO = Path(__file__).resolve().parents[1] / "esep_jax" / "demo_data" / "pystdlib"


def _qrels(folder: str, split: str) -> list[tuple[str, str]]:
    return [tuple(line.split("\t")[:2]) for line in (DEMO / folder / f"{split}.tsv").read_text().splitlines()[1:]]


def test_demo_ingests_and_fits_the_size_budget(tmp_path):
    args = ["ingest", "--out", str(tmp_path / "demo"), "--corpus", str(DEMO / "minilm/corpus.npy"),
            "--corpus-ids", str(DEMO / "minilm/corpus_ids.txt"), "--queries", str(DEMO / "minilm/queries.npy"),
            "--query-ids", str(DEMO / "minilm/queries_ids.txt")]
    for split in ("train", "dev", "test"):
        args += ["--qrels", f"{split}={DEMO / 'qrels' / f'{split}.tsv'}"]
    assert main(args) == 0
    dataset = Dataset(str(tmp_path / "demo"))
    assert dataset.manifest["normalized"] and dataset.corpus_table().dtype.name == "float16"
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 20e6
    norms = np.linalg.norm(dataset.read_corpus(), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-2)


def test_test_functions_never_occur_in_training():
    train_docs = {d for _, d in _qrels("qrels", "train")}
    assert not train_docs & {d for _, d in _qrels("qrels", "test")}
    assert not train_docs & {d for _, d in _qrels("qrels", "dev")}


def test_module_split_holds_out_whole_modules():
    def modules(split):
        return {q.split(":", 1)[1].split(".")[0] for q, _ in _qrels("qrels-by-module", split)}
    assert not modules("train") & modules("test") and not modules("train") & modules("dev")
