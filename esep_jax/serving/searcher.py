"""Serving an exported bundle without JAX: `Searcher.load(bundle).search(query_embeddings, k)`.

Only numpy, scann, safetensors and the standard library are imported (directly and through
`esep_jax.export.format` / `esep_jax.export.scann_index`), so a serving image needs neither JAX, flax nor
tensorstore. `tests/test_serving.py` loads and searches a bundle with those imports made to fail.

Loading verifies the bundle before ScaNN reads any of it (ScaNN trusts its files; a damaged one can crash the
process): the manifest's own checksum, that the files present are exactly those the manifest lists (plain files
only: no symbolic links), that every path the manifest and the index's asset list name stays inside the bundle,
each file's sha256, the head's tensor names and shapes, and the index's size and dimension. Every problem
raises a `BundleError` (a `ValueError`) naming the file.

Integrity, not authenticity: the checksums catch accidental damage (a bad disk, a truncated copy). Someone who
edits a bundle on purpose can recompute them. For that, a bundle exported with a key (`esep-jax export
--sign-key-file K`) carries `manifest.json.hmac`, an HMAC-SHA256 of the manifest under that key, and
`Searcher.load(bundle, key=...)` refuses a bundle whose signature is missing or does not match; since the
manifest holds every other file's sha256, the signature covers the whole bundle.

Results always have k columns. When fewer than k documents come back for a query (a tree search that visits too
few leaves; ScaNN pads such rows with row 0 and a NaN score), the query is searched again exhaustively, and
anything still missing is returned as id `None` with score `-inf` at the end of the row — padding is never
reported as a real document.

Optional parts, loaded when the manifest lists them: the document store (`documents(rows)`, see
`esep_jax.serving.documents`) and the BM25 index for hybrid search (`search(..., hybrid=True, query_texts=...)`
fuses the dense and BM25 results by reciprocal-rank fusion; `search_bm25` is BM25 alone; see
`esep_jax.serving.hybrid`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path

import numpy as np

from esep_jax.export import format as fmt
from esep_jax.export import scann_index
from esep_jax.serving.documents import DocumentStore
from esep_jax.serving.errors import BundleError, ChecksumError, QueryError
from esep_jax.serving.hybrid import BM25Index, Fusion, HybridUnavailable, reciprocal_rank_fusion

MISSING_ID = None  # the id of a result slot with no document (its score is -inf)


def _read_manifest(root: Path, verify: bool) -> dict:
    path = root / fmt.MANIFEST
    if not path.is_file():
        raise BundleError("not found (is this an esep-jax bundle? see `esep-jax export`)", file=str(path))
    raw = path.read_bytes()
    if verify:
        checksum = root / fmt.MANIFEST_CHECKSUM
        if not checksum.is_file():
            raise BundleError("not found", file=str(checksum))
        expected = checksum.read_text(encoding="utf-8", errors="replace").split(" ")[0].strip()
        if hashlib.sha256(raw).hexdigest() != expected:
            raise ChecksumError(f"sha256 differs from {fmt.MANIFEST_CHECKSUM}: the file is damaged", file=str(path))
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"invalid JSON: {error}", file=str(path)) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != fmt.FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise BundleError(f"unsupported format_version {version!r} (this esep_jax reads {fmt.FORMAT_VERSION})",
                          file=str(path), field="format_version")
    for field, kind in (("input_dim", int), ("output_dim", int), ("head", dict), ("corpus", dict),
                        ("index", dict), ("files", dict)):
        if not isinstance(manifest.get(field), kind):
            raise BundleError(f"missing or not a {kind.__name__}", file=str(path), field=field)
    if not isinstance(manifest["corpus"].get("count"), int):
        raise BundleError("missing or not an int", file=str(path), field="corpus.count")
    if manifest.get("metric") != fmt.METRIC:
        raise BundleError(f"unsupported metric {manifest.get('metric')!r}", file=str(path), field="metric")
    return manifest


def _check_inside(root: Path, name: str, what: str) -> None:
    """Refuses a path from the manifest (or the index's asset list) that could leave the bundle."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise BundleError(f"{what} {name!r} is not a path inside the bundle", file=str(root / fmt.MANIFEST))


def verify_signature(root: Path, key: bytes) -> None:
    """Checks `manifest.json.hmac` against the manifest under `key`; a BundleError if missing or wrong."""
    path = root / fmt.MANIFEST_SIGNATURE
    if not path.is_file():
        raise BundleError("not found: the bundle is not signed, but a key was given", file=str(path))
    expected = fmt.manifest_signature((root / fmt.MANIFEST).read_bytes(), key)
    if not hmac.compare_digest(path.read_text(encoding="utf-8", errors="replace").strip(), expected):
        raise ChecksumError("the signature does not match the manifest under this key: the bundle was changed "
                            "after export, or signed with another key", file=str(path))


def _verify_files(root: Path, manifest: dict, verify: bool) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise BundleError("a symbolic link: a bundle holds plain files only", file=str(path))
    for name in manifest["files"]:
        _check_inside(root, name, "file")
    for field, expected in (("path", fmt.INDEX_DIR),):
        if manifest["index"].get(field) != expected:
            raise BundleError(f"must be {expected!r}", file=str(root / fmt.MANIFEST), field=f"index.{field}")
    if manifest["corpus"].get("ids") != fmt.IDS_FILE:
        raise BundleError(f"must be {fmt.IDS_FILE!r}", file=str(root / fmt.MANIFEST), field="corpus.ids")
    listed, present = set(manifest["files"]), set(fmt.bundle_files(root))
    missing, unlisted = sorted(listed - present), sorted(present - listed)
    if missing:
        raise BundleError("missing (listed in manifest.json)", file=str(root / missing[0]))
    if unlisted:
        # Refused, not ignored: an unlisted file is not what was exported (a scann_docids.pkl, say, is what
        # ScaNN's own loader would unpickle).
        raise BundleError("unexpected file, not listed in manifest.json", file=str(root / unlisted[0]))
    if verify:
        for name in sorted(listed):
            if fmt.sha256_file(root / name) != manifest["files"][name]:
                raise ChecksumError("sha256 differs from manifest.json: the file is damaged", file=str(root / name))


def _load_head(root: Path, manifest: dict) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = root / fmt.HEAD_FILE
    head = manifest["head"]
    try:
        expected = fmt.expected_shapes(head)
        tensors = load_file(str(path))
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise BundleError(f"cannot read the head: {error}", file=str(path)) from None
    for name, (shape, required) in expected.items():
        if name not in tensors:
            if required:
                raise BundleError("missing tensor", file=str(path), field=name)
            continue
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != np.float32:
            raise BundleError(f"tensor is {tensors[name].dtype}{list(tensors[name].shape)}, the manifest's dims "
                              f"say float32{list(shape)}", file=str(path), field=name)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise BundleError(f"unexpected tensors {extra}", file=str(path))
    return tensors


def _load_index(root: Path, manifest: dict):
    """The ScaNN searcher, built from the asset list without ScaNN's `load_searcher` (which unpickles docids)."""
    scann_ops_pybind = scann_index.scann_ops()
    index_dir = root / fmt.INDEX_DIR
    assets = index_dir / "scann_assets.pbtxt"
    if not assets.is_file():
        raise BundleError("not found", file=str(assets))
    asset_text = assets.read_text(encoding="utf-8", errors="replace")
    for asset in re.findall(r'asset_path:\s*"([^"]*)"', asset_text):
        _check_inside(root, asset, "index asset")
        if f"{fmt.INDEX_DIR}/{asset}" not in manifest["files"]:
            raise BundleError(f"index asset {asset!r} is not a file the manifest lists", file=str(assets))
    dataset = index_dir / "dataset.npy"
    if dataset.is_file():  # brute force and reordering keep the float32 corpus: check its dims before ScaNN does
        shape = np.load(dataset, mmap_mode="r", allow_pickle=False).shape
        expected = (manifest["corpus"]["count"], manifest["output_dim"])
        if tuple(shape) != expected:
            raise BundleError(f"index holds {list(shape)} vectors, the manifest says {list(expected)}",
                              file=str(dataset))
    try:
        searcher = scann_ops_pybind.ScannSearcher(
            scann_ops_pybind.scann_pybind.ScannNumpy(str(index_dir), asset_text))
    except Exception as error:  # pybind raises RuntimeError/ValueError/...; any of them means an unusable index
        raise BundleError(f"ScaNN cannot load the index: {error}", file=str(index_dir)) from None
    if searcher.size() != manifest["corpus"]["count"]:
        raise BundleError(f"index holds {searcher.size()} documents, the manifest says "
                          f"{manifest['corpus']['count']}", file=str(index_dir))
    return searcher


class Searcher:
    """A loaded bundle: the head in numpy and the ScaNN index. Build with `Searcher.load(path)`."""

    def __init__(self, root: Path, manifest: dict, tensors: dict[str, np.ndarray], ids: list[str], index,
                 documents: DocumentStore | None = None, bm25: BM25Index | None = None,
                 bm25_unavailable: str | None = None):
        self.root, self.manifest, self.tensors, self.index = root, manifest, tensors, index
        self.ids, self.document_store, self.bm25 = ids, documents, bm25
        self._bm25_unavailable = bm25_unavailable  # why a bundle's BM25 index cannot run here (no PyStemmer)
        # Row -1 (a missing result) indexes the trailing MISSING_ID, so padding can never map to a real id.
        self._id_array = np.array(ids + [MISSING_ID], dtype=object)

    @classmethod
    def load(cls, bundle: str | Path, verify_checksums: bool = True, key: bytes | None = None) -> "Searcher":
        """Loads and checks a bundle directory (see the module docstring); raises `BundleError` if unusable.

        `verify_checksums=False` skips hashing the files (faster start-up for a bundle already verified on
        this disk); the structural checks still run. With `key`, the bundle's signature must match.
        """
        root = Path(bundle)
        if not root.is_dir():
            raise BundleError("not a directory (an esep-jax bundle is one)", file=str(root))
        if key is not None:
            verify_signature(root, key)
        manifest = _read_manifest(root, verify_checksums)
        _verify_files(root, manifest, verify_checksums)
        tensors = _load_head(root, manifest)
        ids_path = root / fmt.IDS_FILE
        try:
            ids = ids_path.read_text(encoding="utf-8").split("\n")
            if ids and ids[-1] == "":
                ids.pop()
        except (OSError, UnicodeDecodeError) as error:
            raise BundleError(f"cannot read: {error}", file=str(ids_path)) from None
        if len(ids) != manifest["corpus"]["count"]:
            raise BundleError(f"{len(ids)} ids, the manifest says {manifest['corpus']['count']} documents",
                              file=str(ids_path))
        index = _load_index(root, manifest)
        documents = DocumentStore.open(root, manifest["documents"], ids) if "documents" in manifest else None
        bm25, unavailable = None, None
        if "bm25" in manifest:
            try:
                bm25 = BM25Index.load(root, manifest["bm25"], len(ids))
            except HybridUnavailable as error:  # dense search works without PyStemmer; hybrid says what is missing
                unavailable = str(error)
        return cls(root, manifest, tensors, ids, index, documents, bm25, unavailable)

    @property
    def input_dim(self) -> int:
        return int(self.manifest["input_dim"])

    @property
    def output_dim(self) -> int:
        return int(self.manifest["output_dim"])

    @property
    def num_documents(self) -> int:
        return len(self.ids)

    def _check_queries(self, query_embeddings) -> np.ndarray:
        queries = np.asarray(query_embeddings)
        if queries.dtype.kind not in "fiu":
            raise QueryError(f"query embeddings must be numbers, got dtype {queries.dtype}")
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2:
            raise QueryError(f"query embeddings must be [num_queries, {self.input_dim}], got shape "
                             f"{list(queries.shape)}")
        if queries.shape[1] != self.input_dim:
            raise QueryError(f"query dim {queries.shape[1]} != the bundle's input dim {self.input_dim} "
                             f"(encoder {self.manifest.get('encoder', {}).get('name')!r})")
        queries = queries.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(queries).all(axis=1))
        if bad.size:
            more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
            raise QueryError(f"query row {int(bad[0])}{more} holds NaN or Inf")
        return queries

    def transform(self, query_embeddings) -> np.ndarray:
        """f(q): the head applied to query embeddings, float32 `[Q, output_dim]`."""
        return fmt.apply_head(self.manifest["head"], self.tensors, self._check_queries(query_embeddings))

    @property
    def has_documents(self) -> bool:
        return self.document_store is not None

    @property
    def has_bm25(self) -> bool:
        """Whether hybrid and BM25 search can run: the bundle has a BM25 index and PyStemmer is installed."""
        return self.bm25 is not None

    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        if k > self.num_documents:
            raise QueryError(f"k={k} exceeds the {self.num_documents} documents in the bundle")
        return int(k)

    @property
    def hybrid_unavailable(self) -> str | None:
        """Why hybrid and BM25 search cannot run (no BM25 index in the bundle, or no PyStemmer), else None."""
        if self.bm25 is not None:
            return None
        return self._bm25_unavailable or "the bundle has no BM25 index (export it with --corpus-text and --bm25)"

    def _check_texts(self, query_texts, num_queries: int | None) -> list[str]:
        if self.bm25 is None:
            raise QueryError(self.hybrid_unavailable)
        if query_texts is None:
            raise QueryError("hybrid search needs the query texts (for BM25)")
        texts = [query_texts] if isinstance(query_texts, str) else list(query_texts)
        if not all(isinstance(text, str) for text in texts):
            raise QueryError("query texts must be strings")
        if num_queries is not None and len(texts) != num_queries:
            raise QueryError(f"{len(texts)} query texts for {num_queries} query embeddings")
        return texts

    def search_rows(self, query_embeddings, k: int = 10, *, leaves_to_search: int | None = None,
                    reorder: int | None = None, hybrid: bool | Fusion | None = None, query_texts=None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k corpus rows (int64 `[Q, k]`, -1 where missing) and scores (float32, -inf where missing).

        `leaves_to_search` / `reorder` override the tuned settings recorded at export. With `hybrid` (True for
        the default `Fusion`, or a `Fusion`), the dense top-`depth` and the BM25 top-`depth` of `query_texts`
        (one per query) are fused by RRF, and the scores are the fused ones.
        """
        k = self._check_k(k)
        fusion = None
        if hybrid is not None and hybrid is not False:
            fusion = (Fusion() if hybrid is True else hybrid).check()
            texts = self._check_texts(query_texts, None)
        vectors = self.transform(query_embeddings)
        depth = k if fusion is None else min(max(k, int(fusion.depth)), self.num_documents)
        rows, scores = self._dense(vectors, depth, leaves_to_search, reorder)
        if fusion is None:
            return rows, scores
        if len(texts) != len(vectors):
            raise QueryError(f"{len(texts)} query texts for {len(vectors)} query embeddings")
        bm25_rows, _ = self.bm25.search_rows(texts, depth)
        return reciprocal_rank_fusion([rows, bm25_rows], [fusion.dense_weight, fusion.bm25_weight], fusion.k_rrf, k)

    def _dense(self, vectors: np.ndarray, k: int, leaves_to_search, reorder) -> tuple[np.ndarray, np.ndarray]:
        settings = self.manifest["index"]
        leaves = leaves_to_search if leaves_to_search is not None else settings.get("leaves_to_search")
        reorder = reorder if reorder is not None else settings.get("reorder")
        rows, scores = scann_index.search(self.index, vectors, int(k), leaves, reorder)
        short = np.flatnonzero((rows < 0).any(axis=1))
        if short.size:  # searched too narrowly for these queries: again over every leaf (AH ranks all of them)
            rows[short], scores[short] = scann_index.search(
                self.index, vectors[short], int(k), settings.get("num_leaves"), max(int(reorder or 0), int(k)))
        return rows, scores

    def search(self, query_embeddings, k: int = 10, **options) -> tuple[np.ndarray, np.ndarray]:
        """Top-k document ids (object array `[Q, k]`, `None` where missing) and scores (float32, -inf there).

        `query_embeddings` is `[Q, input_dim]` (or one `[input_dim]` vector) of the bundle's encoder, before
        the head. Raises `QueryError` for a wrong shape or dimension, NaN/Inf rows, or k outside 1..N.
        `options` are those of `search_rows` (index overrides, `hybrid` and `query_texts`).
        """
        rows, scores = self.search_rows(query_embeddings, k, **options)
        return self._id_array[rows], scores

    def search_bm25_rows(self, query_texts, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """BM25 alone: top-k rows and BM25 scores per query text (-1 / -inf past the documents that match)."""
        k = self._check_k(k)
        return self.bm25.search_rows(self._check_texts(query_texts, None), k)

    def search_bm25(self, query_texts, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """BM25 alone: top-k ids (`None` past the documents sharing a term with the query) and scores."""
        rows, scores = self.search_bm25_rows(query_texts, k)
        return self._id_array[rows], scores

    def documents(self, rows) -> list[dict | None]:
        """`{"title", "text"}` per corpus row (`None` for -1); a `QueryError` if the bundle stores no documents."""
        if self.document_store is None:
            raise QueryError("the bundle has no document store (export it with --corpus-text)")
        return self.document_store.get(rows)
