"""Property-based fuzzing of ingest inputs and command lines: a clean one-line error or success, never a
traceback, never a partial output directory."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ingest_args, write_synthetic_sources
from esep_jax.cli import main
from esep_jax.data.dataset import Dataset
from esep_jax.errors import InputError
from esep_jax.data.beir import read_beir_corpus, read_beir_queries

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
TEMPLATE = Path(tempfile.mkdtemp(prefix="esep-fuzz-"))
SOURCES = write_synthetic_sources(TEMPLATE / "src", num_docs=20, num_queries=12, dim=4)

text_lines = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30), max_size=8)
mutations = st.one_of(
    st.just(None),  # leave the file valid
    st.binary(max_size=200).map(lambda b: ("bytes", b)),
    text_lines.map(lambda lines: ("text", "\n".join(lines))),
    st.integers(0, 300).map(lambda n: ("truncate", n)),
    st.tuples(st.integers(0, 50), st.sampled_from(["\t", " ", "x", "-1", "nan", "1e999", "\n", "q1", "d3"]))
      .map(lambda t: ("insert", t)),
)


def _apply(path: Path, mutation) -> None:
    if mutation is None:
        return
    kind, value = mutation
    data = path.read_bytes()
    if kind == "bytes":
        path.write_bytes(value)
    elif kind == "text":
        path.write_text(value)
    elif kind == "truncate":
        path.write_bytes(data[:value])
    else:
        position, token = value
        lines = data.decode("utf-8", "replace").splitlines()
        lines.insert(min(position, len(lines)), token)
        path.write_text("\n".join(lines) + "\n")


def _run(args: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        try:
            code = main(args)
        except SystemExit as exit_info:  # --help
            code = exit_info.code
    return code, stderr.getvalue()


@FUZZ
@given(corpus=mutations, corpus_ids=mutations, queries=mutations, query_ids=mutations, train=mutations,
       test=mutations)
def test_fuzzed_ingest_inputs(corpus, corpus_ids, queries, query_ids, train, test):
    work = Path(tempfile.mkdtemp(prefix="case-", dir=TEMPLATE))
    try:
        shutil.copytree(TEMPLATE / "src", work / "src")
        sources = {k: v.replace(str(TEMPLATE / "src"), str(work / "src")) if isinstance(v, str) else
                   {s: p.replace(str(TEMPLATE / "src"), str(work / "src")) for s, p in v.items()}
                   for k, v in SOURCES.items()}
        for key, mutation in (("corpus", corpus), ("corpus_ids", corpus_ids), ("queries", queries),
                              ("query_ids", query_ids)):
            _apply(Path(sources[key]), mutation)
        _apply(Path(sources["qrels"]["train"]), train)
        _apply(Path(sources["qrels"]["test"]), test)
        out = work / "out"
        code, stderr = _run(ingest_args(sources, out, splits=("train", "test")))
        assert code in (0, 2), stderr
        if code == 2:
            assert stderr.startswith("esep-jax: error: ") and stderr.count("\n") == 1, stderr
            assert not out.exists() and not [p for p in work.iterdir() if p.name.startswith(".out.")]
        else:
            dataset = Dataset(str(out))
            assert np.isfinite(dataset.read_corpus()).all()
            assert dataset.qrels("train").num_queries > 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


@FUZZ
@given(lines=st.lists(st.one_of(
    st.text(max_size=40),
    st.dictionaries(st.sampled_from(["_id", "text", "title", "x"]),
                    st.one_of(st.text(max_size=10), st.integers(), st.none(), st.lists(st.integers(), max_size=2)),
                    max_size=4).map(json.dumps)), max_size=6))
def test_fuzzed_beir_jsonl(lines):
    path = TEMPLATE / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for reader in (read_beir_corpus, read_beir_queries):
        try:
            ids, texts, _ = reader(path)
        except InputError as error:
            assert str(error).startswith(str(path)), error
            assert "\n" not in str(error)
        else:
            assert len(ids) == len(texts) and all(isinstance(t, str) for t in texts)


TOKENS = ["ingest", "train", "eval", "bench", "--out", "--corpus", "--qrels", "train=x", "=", "--data", "--split",
          "--workdir", "--json", "--config", "--config.train.batch_size=0", "--config.nope=1", "--config.model.head",
          "--help", "-h", "--dtype", "int8", "--k", "", "x", "/nonexistent", "--beir", "--no-progress", "--stop-at-step",
          "-1", "abc"]


@FUZZ
@given(args=st.lists(st.sampled_from(TOKENS), max_size=7))
def test_fuzzed_command_lines(args):
    args = [a.replace("/nonexistent", str(TEMPLATE / "missing")) for a in args]
    if args[:1] == ["bench"]:
        args = args[:1] + ["--help"]  # never start a real benchmark from a fuzzer
    code, stderr = _run(args)
    assert code in (0, 2), (args, stderr)
    if code == 2:
        assert stderr.startswith("esep-jax: error: ") and stderr.count("\n") == 1, (args, stderr)
