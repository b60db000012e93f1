"""Hybrid retrieval: the bundle's optional BM25 index, and reciprocal-rank fusion (RRF) with the dense results.

Built at export (`esep-jax export --corpus-text corpus.jsonl --bm25`) by the library bm25s over each document's
`title + " " + text` (the text the dense encoder saw), tokenised by `Tokenizer`: lower-cased, split on
`\\b\\w\\w+\\b`, English stopwords (bm25s's list) removed, stemmed by PyStemmer's English Snowball stemmer — the
rules of `bm25s.tokenize(..., stopwords="en", stemmer=Stemmer.Stemmer("english"))`. The index is stored the way
`bm25s.BM25.save` writes it (the document × term score matrix in CSC form as three .npy arrays, the vocabulary
and parameters as JSON; no pickle, and `bm25s.BM25.load(bundle / "bm25")` reads it), plus `tokenizer.json`.

Searching does not use bm25s: importing bm25s imports JAX when it is installed (for its top-k), and serving must
stay JAX-free. A query's BM25 scores are the sums of its terms' columns of the score matrix — exactly what
bm25s computes for its "lucene", "robertson" and "atire" variants, which need nothing else — read with numpy.
Only PyStemmer (a small C extension) is needed at query time.

Fusion (Cormack et al., 2009): `score(d) = Σ_s w_s / (k_rrf + rank_s(d))` over the systems whose top-`depth`
list holds d (ranks from 1); the same formula as `esep_jax.evaluation.fusion`, which fuses TREC runs (serving
cannot import the evaluation stage). Ties go to the document the dense list ranks higher, then the BM25 list.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import threading
from pathlib import Path

import numpy as np

from esep_jax.errors import InputError
from esep_jax.export import format as fmt
from esep_jax.serving.errors import BundleError, QueryError

TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # bm25s's default (and scikit-learn's)
STEMMER_LANGUAGE = "english"
METHODS = ("lucene", "robertson", "atire")  # BM25 variants whose scores are column sums (no non-occurrence term)
ARRAYS = {"data": "data.csc.index.npy", "indices": "indices.csc.index.npy", "indptr": "indptr.csc.index.npy"}
VOCAB_FILE, PARAMS_FILE, TOKENIZER_FILE = "vocab.index.json", "params.index.json", "tokenizer.json"
_INSTALL_HINT = "pip install 'esep-jax[hybrid]'"


class HybridUnavailable(QueryError):
    """BM25 cannot run in this environment (PyStemmer is not installed); dense search still can."""


class Tokenizer:
    """bm25s's tokenisation with PyStemmer, re-implemented so queries need neither bm25s nor JAX."""

    def __init__(self, stopwords, language: str = STEMMER_LANGUAGE, lower: bool = True,
                 token_pattern: str = TOKEN_PATTERN):
        try:
            import Stemmer
        except ImportError:
            raise HybridUnavailable(f"BM25 queries need PyStemmer: {_INSTALL_HINT}") from None
        self.stopwords, self.language, self.lower, self.token_pattern = frozenset(stopwords), language, lower, token_pattern
        self._split = re.compile(token_pattern).findall
        self._stemmer = Stemmer.Stemmer(language)
        self._lock = threading.Lock()  # a PyStemmer object must not be used by two threads at once

    def __call__(self, texts: list[str]) -> list[list[str]]:
        words = [[w for w in self._split(t.lower() if self.lower else t) if w not in self.stopwords] for t in texts]
        with self._lock:
            return [self._stemmer.stemWords(w) for w in words]

    def describe(self) -> dict:
        return {"lower": self.lower, "token_pattern": self.token_pattern, "stemmer": f"PyStemmer/{self.language}",
                "stopwords": sorted(self.stopwords)}


def write_bm25_index(root: Path, texts: list[str], k1: float = 1.5, b: float = 0.75, method: str = "lucene") -> dict:
    """Builds the BM25 index of `texts` (one per corpus row) with bm25s into `root/bm25`; returns the manifest's
    `bm25` entry. Export-time only: bm25s imports JAX when it is installed."""
    try:
        import bm25s
        from bm25s.stopwords import STOPWORDS_EN
    except ImportError:
        raise InputError(f"needs bm25s and PyStemmer: {_INSTALL_HINT}", field="--bm25") from None
    tokenizer = Tokenizer(STOPWORDS_EN)
    retriever = bm25s.BM25(k1=k1, b=b, method=method)
    directory = root / fmt.BM25_DIR
    library_log = logging.getLogger("bm25s")
    level = library_log.level
    library_log.setLevel(logging.WARNING)  # bm25s logs each build step at DEBUG to whatever handler is set up
    try:
        retriever.index(tokenizer(texts), show_progress=False)
        retriever.save(str(directory), show_progress=False)  # arrays with allow_pickle=False, JSON for the rest
    finally:
        library_log.setLevel(level)
    (directory / TOKENIZER_FILE).write_text(json.dumps(tokenizer.describe(), indent=1) + "\n", encoding="utf-8")
    unexpected = sorted(p.name for p in directory.iterdir() if p.name not in {*ARRAYS.values(), VOCAB_FILE,
                                                                              PARAMS_FILE, TOKENIZER_FILE})
    if unexpected:  # a new bm25s version writing something else (a pickle, say) must not slip into bundles
        raise RuntimeError(f"bm25s wrote unexpected files {unexpected}; this esep_jax does not bundle them")
    return {"path": fmt.BM25_DIR, "library": "bm25s", "version": bm25s.__version__, "method": method, "k1": k1,
            "b": b, "vocabulary": len(retriever.vocab_dict), "text": "title + ' ' + text",
            "tokenizer": {key: value for key, value in tokenizer.describe().items() if key != "stopwords"}}


class BM25Index:
    """A bundle's BM25 index, searched with numpy. Build with `BM25Index.load`."""

    def __init__(self, data, indices, indptr, vocab: dict[str, int], num_docs: int, tokenizer: Tokenizer):
        self.data, self.indices, self.indptr, self.vocab = data, indices, indptr, vocab
        self.num_docs, self.tokenize = num_docs, tokenizer

    @classmethod
    def load(cls, root: Path, entry: dict, num_docs: int) -> "BM25Index":
        """Reads and checks `root/bm25` (shapes, ranges, parameters); a `BundleError` naming the file."""
        directory = root / fmt.BM25_DIR
        if not isinstance(entry, dict) or entry.get("path") != fmt.BM25_DIR:
            raise BundleError(f"must name {fmt.BM25_DIR!r}", file=str(root / fmt.MANIFEST), field="bm25.path")
        params, vocab, tokenizer = (_read_json(directory / name) for name in (PARAMS_FILE, VOCAB_FILE, TOKENIZER_FILE))
        if params.get("method") not in METHODS or params.get("num_docs") != num_docs:
            raise BundleError(f"method {params.get('method')!r} for {params.get('num_docs')!r} documents: this "
                              f"esep_jax serves {', '.join(METHODS)} for the bundle's {num_docs}",
                              file=str(directory / PARAMS_FILE))
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise BundleError("expected {token: id}", file=str(directory / VOCAB_FILE))
        arrays = {}
        for name, file in ARRAYS.items():
            try:
                arrays[name] = np.load(directory / file, allow_pickle=False, mmap_mode="r")
            except (OSError, ValueError, EOFError) as error:
                raise BundleError(f"cannot read as .npy: {error}", file=str(directory / file)) from None
        data, indices, indptr = arrays["data"], arrays["indices"], arrays["indptr"]
        ok = (data.ndim == indices.ndim == indptr.ndim == 1 and data.dtype.kind == "f" and indices.dtype.kind in "iu"
              and indptr.dtype.kind in "iu" and len(data) == len(indices) and 1 <= len(indptr) <= len(vocab) + 1
              and (len(vocab) == 0 or max(vocab.values()) < len(vocab)) and indptr[0] == 0
              and indptr[-1] == len(data) and not (np.diff(indptr) < 0).any()
              and (len(indices) == 0 or (int(indices.min()) >= 0 and int(indices.max()) < num_docs)))
        if not ok:
            raise BundleError(f"the score matrix is not a valid CSC [{num_docs} docs x <= {len(vocab)} terms]",
                              file=str(directory))
        try:
            tokenize = Tokenizer(tokenizer["stopwords"], tokenizer["stemmer"].split("/")[-1], tokenizer["lower"],
                                 tokenizer["token_pattern"])
        except (KeyError, TypeError, AttributeError, re.error) as error:
            raise BundleError(f"cannot rebuild the tokenizer: {error}", file=str(directory / TOKENIZER_FILE)) from None
        return cls(data, indices, indptr, vocab, num_docs, tokenize)

    def scores(self, tokens: list[str]) -> np.ndarray:
        """float32 `[N]` BM25 scores of one tokenised query (a repeated term counts again, as in bm25s)."""
        # bm25s adds the empty token to the vocabulary without a column of the matrix: such ids score nothing.
        ids = [i for i in (self.vocab.get(t) for t in tokens) if i is not None and i < len(self.indptr) - 1]
        if not ids:
            return np.zeros(self.num_docs, np.float32)
        postings = [slice(int(self.indptr[i]), int(self.indptr[i + 1])) for i in ids]
        rows = np.concatenate([self.indices[p] for p in postings])
        values = np.concatenate([self.data[p] for p in postings])
        return np.bincount(rows, weights=values, minlength=self.num_docs).astype(np.float32)

    def search_rows(self, texts: list[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`depth` rows (int64 `[Q, depth]`) and scores per query text; documents sharing no term with the
        query are not results (row -1, score -inf), so a query with no known term has none."""
        depth = min(int(depth), self.num_docs)
        rows = np.full((len(texts), depth), -1, np.int64)
        scores = np.full((len(texts), depth), -np.inf, np.float32)
        for i, tokens in enumerate(self.tokenize(list(texts))):
            values = self.scores(tokens)
            matched = np.flatnonzero(values > 0)
            # Score descending, then row ascending: deterministic, unlike a partition's arbitrary ties.
            best = matched[np.lexsort((matched, -values[matched]))][:depth]
            rows[i, :len(best)], scores[i, :len(best)] = best, values[best]
        return rows, scores


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"cannot read as JSON: {error}", file=str(path)) from None


@dataclasses.dataclass(frozen=True)
class Fusion:
    """How dense and BM25 results are fused: RRF's k, each system's weight, and each list's depth."""

    k_rrf: float = 60.0
    dense_weight: float = 1.0
    bm25_weight: float = 1.0
    depth: int = 100

    def check(self) -> "Fusion":
        """Itself, or a `QueryError` naming the bad setting."""
        for name in ("k_rrf", "dense_weight", "bm25_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise QueryError(f"hybrid.{name} must be a finite number >= 0, got {value!r}")
        if self.dense_weight == self.bm25_weight == 0:
            raise QueryError("hybrid: dense_weight and bm25_weight cannot both be 0")
        if isinstance(self.depth, bool) or not isinstance(self.depth, (int, np.integer)) or self.depth < 1:
            raise QueryError(f"hybrid.depth must be a positive integer, got {self.depth!r}")
        return self


def reciprocal_rank_fusion(rankings: list[np.ndarray], weights: list[float], k_rrf: float, k: int
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Fuses per-query ranked row lists (`[Q, depth_s]` each, best first, -1 = no document) by RRF.

    Returns the top-k fused rows (int64 `[Q, k]`, -1 where fewer than k documents were in any list) and their
    fused scores (float32, -inf there). Ties: the better rank in the first list, then the next, then the row.
    """
    num_queries = rankings[0].shape[0]
    rows = np.full((num_queries, k), -1, np.int64)
    scores = np.full((num_queries, k), -np.inf, np.float32)
    for q in range(num_queries):
        fused: dict[int, float] = {}
        ranks: dict[int, list[float]] = {}
        for s, (ranking, weight) in enumerate(zip(rankings, weights)):
            for rank, row in enumerate(ranking[q].tolist(), start=1):
                if row < 0 or row in ranks and ranks[row][s] != math.inf:
                    continue  # no document, or a repeat within one list (only its best rank counts)
                fused[row] = fused.get(row, 0.0) + weight / (k_rrf + rank)
                ranks.setdefault(row, [math.inf] * len(rankings))[s] = rank
        best = sorted(fused, key=lambda r: (-fused[r], *ranks[r], r))[:k]
        rows[q, :len(best)] = best
        scores[q, :len(best)] = [fused[r] for r in best]
    return rows, scores
