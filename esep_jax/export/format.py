"""The serving bundle's on-disk format, and the head applied with numpy alone.

A bundle is a directory:

    manifest.json            everything needed to use the bundle (see below), incl. sha256 of every other file
    manifest.json.sha256     sha256 of manifest.json in `sha256sum` format, so the manifest is covered too
    manifest.json.hmac       optional: HMAC-SHA256 of manifest.json under the exporter's key (authenticity)
    head.safetensors         the head's tensors (float32; safetensors holds raw arrays only, never pickle)
    corpus_ids.txt           the id of each corpus row, one per line, in ScaNN's row order
    index/                   the ScaNN searcher, `searcher.serialize(dir, relative_path=True)`
    documents.jsonl          optional (`export --corpus-text`): `{"id", "title", "text"}` per corpus row, in row order
    documents.offsets.npy    its byte offsets, int64 `[N + 1]`, so one document is read without the others
    bm25/                    optional (`export --bm25`): a BM25 index over the same texts, in bm25s's own format
                             (`BM25.save`: CSC score matrix as .npy, vocabulary and parameters as JSON; no pickle)
                             plus `tokenizer.json` (lower-casing, token pattern, stopwords, stemmer)

Every file, optional ones included, is listed with its sha256 in `manifest["files"]`.

Heads (`manifest["head"]["kind"]`); a trained ensemble of members f_m is served as `f(q) = Σ_m w_m f_m(q)`
(weights summing to 1: the mean of the members' query vectors, or dev-chosen weights):
- `linear`: `f(q) = q @ W + b` with `W [d_in, d_out]`, `b [d_out]` (b optional). `linear` and `lowrank` heads
  and any weighted combination of their members fold to this exactly (`W = eye(d_in, d_out) + Σ_m w_m D_m`).
- `mlp`: `f(q) = E q + Σ_m w_m (gelu(q @ hidden.kernel[m] + hidden.bias[m]) @ out.kernel[m] + out.bias[m])` with
  `member_weights [M]`, where E truncates or zero-pads q to `d_out` (`esep_jax.heads.base.base_projection`)
  and gelu is the tanh approximation (flax's `nn.gelu` default). Every tensor has the leading member axis M.
- Either kind may carry the in-domain gate (`head["gate"]`: neighbours, lower, upper; tensor `gate.anchors
  [T, d_in]`, unit rows): `f_gated(q) = E q + g(q) (f(q) − E q)` with `g` from the query's mean cosine to its
  nearest anchors (`esep_jax.heads.gate`).

This module imports numpy only: the JAX-free serving path (`esep_jax.serving`) shares it with the exporter.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from pathlib import Path

import numpy as np

from esep_jax.heads.gate import Gate, base_projection, gated

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest.json.sha256"
MANIFEST_SIGNATURE = "manifest.json.hmac"  # optional: HMAC-SHA256 of manifest.json under the exporter's key
HEAD_FILE = "head.safetensors"
IDS_FILE = "corpus_ids.txt"
INDEX_DIR = "index"
DOCUMENTS_FILE = "documents.jsonl"
DOCUMENT_OFFSETS_FILE = "documents.offsets.npy"
BM25_DIR = "bm25"
HEAD_KINDS = ("linear", "mlp")
METRIC = "dot_product"

# The tensors of each head kind: name -> (shape as manifest dims, required). M = members, H = hidden width.
TENSORS = {
    "linear": {"W": (("input_dim", "output_dim"), True), "b": (("output_dim",), False)},
    "mlp": {"member_weights": (("members",), True),
            "hidden.kernel": (("members", "input_dim", "hidden_dim"), True),
            "hidden.bias": (("members", "hidden_dim"), True),
            "out.kernel": (("members", "hidden_dim", "output_dim"), True),
            "out.bias": (("members", "output_dim"), False)},
}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """`jax.nn.gelu(x, approximate=True)`, term for term: x · ½(1 + tanh(√(2/π)(x + 0.044715 x³)))."""
    return x * (0.5 * (1.0 + np.tanh(np.asarray(_SQRT_2_OVER_PI, x.dtype) * (x + 0.044715 * x ** 3))))


def apply_head(head: dict, tensors: dict[str, np.ndarray], queries: np.ndarray) -> np.ndarray:
    """f(queries) for a bundle head (`manifest["head"]` and its tensors), float32 `[Q, output_dim]`, blended
    with the base by the head's in-domain gate when it has one (`head["gate"]`, tensor `gate.anchors`)."""
    queries = np.asarray(queries, np.float32)
    vectors = _apply_ungated(head, tensors, queries)
    if head.get("gate"):
        vectors = gated(Gate.from_description(head["gate"], tensors["gate.anchors"]), queries, vectors)
    return vectors


def _apply_ungated(head: dict, tensors: dict[str, np.ndarray], queries: np.ndarray) -> np.ndarray:
    if head["kind"] == "linear":
        out = queries @ tensors["W"]
        return out + tensors["b"] if "b" in tensors else out
    if head["kind"] == "mlp":
        # [M, Q, H] -> [M, Q, d_out], then the members' weighted sum (the ensemble's combination).
        hidden = gelu_tanh(np.einsum("qd,mdh->mqh", queries, tensors["hidden.kernel"])
                           + tensors["hidden.bias"][:, None, :])
        residual = np.einsum("mqh,mho->mqo", hidden, tensors["out.kernel"])
        if "out.bias" in tensors:
            residual = residual + tensors["out.bias"][:, None, :]
        residual = np.einsum("m,mqo->qo", tensors["member_weights"], residual)
        return base_projection(queries, head["output_dim"]) + residual
    raise ValueError(f"unknown head kind {head['kind']!r} (this esep_jax serves {', '.join(HEAD_KINDS)})")


def expected_shapes(head: dict) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The shape every tensor of `head` must have, and whether it is required, from the manifest's dims."""
    if head.get("kind") not in TENSORS:
        raise ValueError(f"unknown head kind {head.get('kind')!r} (this esep_jax serves {', '.join(HEAD_KINDS)})")
    shapes = {name: (tuple(int(head[dim]) for dim in dims), required)
              for name, (dims, required) in TENSORS[head["kind"]].items()}
    if head.get("gate"):
        shapes["gate.anchors"] = ((int(head["gate"]["anchors"]), int(head["input_dim"])), True)
    return shapes


def sha256_file(path: Path | str, block: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in blocks (index files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(root: Path | str) -> list[str]:
    """Every regular file under `root` as a sorted relative POSIX path, except the manifest and its checksum."""
    root = Path(root)
    paths = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(p for p in paths if p not in (MANIFEST, MANIFEST_CHECKSUM, MANIFEST_SIGNATURE))


def manifest_signature(manifest_bytes: bytes, key: bytes) -> str:
    """The hex HMAC-SHA256 of the manifest's bytes under `key`."""
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def read_key(path: str) -> bytes:
    """A signing key from a file (its bytes, surrounding whitespace stripped); at least 16 bytes."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the key: {error.strerror or error}") from None
    if len(key) < 16:
        raise ValueError(f"{path}: a signing key needs at least 16 bytes, got {len(key)}")
    return key
