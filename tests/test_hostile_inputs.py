"""Hostile and broken inputs: each is refused with one line naming the file/field, a non-zero exit, and nothing
half-written — never a traceback, never a silently wrong result."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, ingest_args, write_synthetic_sources
from esep_jax.cli import main
from esep_jax.data.beir import MAX_TEXT_CHARS, read_beir_corpus
from esep_jax.data.ids import read_ids
from esep_jax.errors import InputError

FAST = ["--config.train.num_steps=20", "--config.train.eval_every=10", "--config.train.batch_size=32",
        "--config.optim.weight_decay=1e-4", "--no-progress"]


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("esep-jax: error: ") and error.count("\n") == 1, error
    return error


@pytest.mark.parametrize("bad_id", ["doc\nnext", "doc\u2028next", "doc\tnext", "doc next", "doc\u200bnext", " "])
def test_beir_ids_with_line_breaks_tabs_or_spaces_are_refused(tmp_path, bad_id):
    lines = [json.dumps({"_id": f"d{i}", "title": "", "text": f"text {i}"}) for i in range(30)]
    lines[20] = json.dumps({"_id": bad_id, "title": "", "text": "text"})
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=f"{path}: line 21: _id: "):
        read_beir_corpus(path)


def test_beir_ingest_with_a_bad_id_leaves_nothing(tmp_path, capsys):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "a\u2028b", "text": "x"}) + "\n")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "y"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("q\ta\u2028b\t1\n")
    assert main(["ingest", "--beir", str(beir), "--out", str(tmp_path / "out")]) == 2
    assert "LINE SEPARATOR" in _one_line_error(capsys) and not (tmp_path / "out").exists()


def test_bad_utf8_in_beir_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=f"{path}: line 2: not UTF-8"):
        read_beir_corpus(path)


def test_a_huge_single_line_document_is_cut_before_encoding(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"_id": "big", "text": "word " * 400_000}) + "\n")  # 2 MB on one line
    ids, texts, cut = read_beir_corpus(path)
    assert ids == ["big"] and len(texts[0]) == MAX_TEXT_CHARS and cut == 1


def test_an_id_file_with_a_unicode_line_separator_is_refused(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("a\nb\u2028c\nd\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"ids.txt: line 2: id 'b\\u2028c' contains LINE SEPARATOR"):
        read_ids(str(path))


def test_qrels_grades_outside_int32_are_refused(tmp_path, capsys):
    sources = write_synthetic_sources(tmp_path / "src")
    Path(sources["qrels"]["train"]).write_text("q0\td0\t99999999999\n")
    assert main(ingest_args(sources, tmp_path / "out", splits=("train",))) == 2
    assert "line 1: score: score 99999999999 is outside" in _one_line_error(capsys)


def test_paths_with_dot_dot_work(tmp_path, capsys):
    sources = write_synthetic_sources(tmp_path / "src")
    (tmp_path / "sub").mkdir()
    out = tmp_path / "sub" / ".." / "data"
    assert main(ingest_args(sources, out)) == 0
    assert main(["train", "--data", str(out), "--workdir", str(tmp_path / "sub" / ".." / "run"), *FAST]) == 0


def test_a_different_dataset_at_the_same_path_is_refused(tmp_path, capsys):
    data, workdir = tmp_path / "data", tmp_path / "run"
    assert main(ingest_args(write_synthetic_sources(tmp_path / "a", seed=0), data)) == 0
    assert main(["train", "--data", str(data), "--workdir", str(workdir), *FAST, "--stop-at-step", "10"]) == 0
    assert main(ingest_args(write_synthetic_sources(tmp_path / "b", seed=1), data) + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--workdir", str(workdir), *FAST]) == 2
    assert "holds a run on different data (dataset fingerprint" in _one_line_error(capsys)


def test_the_same_data_reingested_resumes(tmp_path, capsys):
    sources = write_synthetic_sources(tmp_path / "a")
    data, workdir = tmp_path / "data", tmp_path / "run"
    assert main(ingest_args(sources, data)) == 0
    assert main(["train", "--data", str(data), "--workdir", str(workdir), *FAST, "--stop-at-step", "10"]) == 0
    assert main(ingest_args(sources, data) + ["--overwrite"]) == 0  # same content, new timestamp
    assert main(["train", "--data", str(data), "--workdir", str(workdir), *FAST]) == 0


@pytest.mark.parametrize("override, fragment", [
    ("--config.loss.teacher=nope", "config.loss.teacher: no candidates named 'nope'"),
    ("--config.loss.hard_negatives=nope", "hard negatives join the sampled softmax"),
    ("--config.optim.weight_decay=nan", "config.optim.weight_decay: must be >= 0, got nan"),
    ("--config.loss.matryoshka_dims=64", "prefix sizes must be < the corpus dim 16"),
    ("--config.loss.distill=mse", "loss.distill needs target vectors"),
])
def test_config_errors_found_late_leave_the_workdir_untouched(synthetic_dataset, tmp_path, capsys, override, fragment):
    workdir = tmp_path / "run"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST, override]) == 2
    assert fragment in _one_line_error(capsys)
    assert not workdir.exists()
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST]) == 0  # corrected: runs


@pytest.mark.parametrize("override", ["--config.train.batch_size=10000000", "--config.model.head=mlp",
                                      "--config.ensemble.members=100000"])
def test_runs_that_cannot_fit_in_memory_are_refused_up_front(demo_dataset, tmp_path, capsys, override):
    """The probes (384-d demo data): each of these used to grow to the OOM killer (14 GB, 8 GB, minutes)."""
    extra = ["--config.model.hidden_dim=10000000"] if override.endswith("mlp") else []
    started = time.monotonic()
    assert main(["train", "--data", demo_dataset, "--workdir", str(tmp_path / "run"), *FAST, override,
                 *extra]) == 2
    error = _one_line_error(capsys)
    assert "this run needs about" in error and "GiB" in error and "of available host memory" in error
    assert time.monotonic() - started < 30 and not (tmp_path / "run").exists()


def test_query_embeddings_whose_header_declares_more_than_the_file_holds(tmp_path):
    from esep_jax.cli.bundle_commands import _search_embeddings

    path = tmp_path / "q.npy"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000000, 16), }"
    header += " " * (118 - len(header)) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64)

    class Args:
        queries, text = str(path), None

    with pytest.raises(InputError, match=f"{path}: cannot read as .npy"):
        _search_embeddings(Args, {}, None)


def _limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """Runs the CLI with every file write past `limit` bytes failing, as on a full disk (EFBIG for ENOSPC)."""
    code = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            f"from esep_jax.cli import main\nsys.exit(main({args!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_a_full_disk_during_ingest_is_one_line_and_leaves_nothing(tmp_path):
    sources = write_synthetic_sources(tmp_path / "src")
    result = _limited(ingest_args(sources, tmp_path / "out"), 20_000)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not write the dataset" in lines[0] and "File too large" in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no output, no .out.tmp-* folder


def test_a_full_disk_while_writing_the_run_files_is_one_line_and_a_rerun_works(synthetic_dataset, tmp_path):
    workdir = tmp_path / "run"
    result = _limited(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST], 600)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esep-jax: error: could not write") and "File too large" in lines[0]
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST]) == 0


def test_a_full_disk_during_a_checkpoint_prints_only_the_clear_line(synthetic_dataset, tmp_path):
    workdir = tmp_path / "run"
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST, "--stop-at-step", "10"]) == 0
    result = _limited(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST], 3_000)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esep-jax: error: could not write"), result.stderr[-2000:]
    assert main(["train", "--data", synthetic_dataset, "--workdir", str(workdir), *FAST]) == 0
