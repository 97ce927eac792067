"""Prompt embeddings, computed once per logged request and kept beside the inference log.

The monitoring flow embeds, in batches, the requests of its window that have no embedding
yet, and reads the stored vectors back: a request is embedded once, however many checks
look at it. The vectors live in the inference log's database (`prompt_embedding`, owned by
tuneloop.inferencelog); this module computes them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneloop.embedder import BUILTIN_EMBEDDER, Embedder, embedder_key, load_embedder
from tuneloop.inferencelog import InferenceLog

__all__ = ["BUILTIN_EMBEDDER", "Embedder", "embed_missing", "embedder_key", "load_embedder"]

log = logging.getLogger(__name__)


def embed_missing(
    store: InferenceLog,
    request_ids: Sequence[str],
    prompts: Sequence[str],
    model_key: str,
    embedder: Embedder,
    chunk: int = 512,
) -> int:
    """Embed the prompts whose request has no stored vector yet; return how many were embedded.

    Stored chunk by chunk: a run stopped half-way keeps what it embedded.
    """
    todo = set(store.missing_embeddings(request_ids, model_key))
    pending = [(rid, text) for rid, text in zip(request_ids, prompts, strict=True) if rid in todo]
    pending = list(dict(pending).items())  # a request id listed twice is embedded once
    for i in range(0, len(pending), chunk):
        part = pending[i : i + chunk]
        store.add_embeddings([rid for rid, _ in part], model_key, embedder([text for _, text in part]))
    return len(pending)


@task(name="embed-new-requests", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def embed_new_requests(
    db_url: str, request_ids: list[str], prompts: list[str], model: str, max_tokens: int
) -> tuple[np.ndarray, int]:
    """Persist embeddings of the requests that lack one; return every request's vector and how many were new."""
    store = InferenceLog(db_url)
    try:
        key = embedder_key(model, max_tokens)
        missing = store.missing_embeddings(request_ids, key)
        new = embed_missing(store, request_ids, prompts, key, load_embedder(model, max_tokens)) if missing else 0
        return store.embeddings(request_ids, key), new
    finally:
        store.close()


@task(name="embed-reference", cache_policy=NO_CACHE)
def embed_reference(texts: list[str], model: str, max_tokens: int, cache_dir: Path) -> np.ndarray:
    """Return embeddings of the reference prompts, cached on disk by model and content."""
    key = hashlib.sha256("\x00".join([embedder_key(model, max_tokens), *texts]).encode()).hexdigest()[:24]
    path = cache_dir / f"reference-{key}.npy"
    if path.exists():
        return np.load(path)
    vectors = load_embedder(model, max_tokens)(texts) if texts else np.zeros((0, 0), dtype=np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npy")
    np.save(tmp, vectors)
    tmp.replace(path)  # a reader never sees half a file
    return vectors


@task(name="embed-window", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def embed_window(db_url: str, window: Any, m: Any) -> tuple[np.ndarray, int]:
    """Return the embeddings of a window's answered prompts (stored once per request) and how many were new."""
    answered = window.answered
    if not answered:
        return np.zeros((0, 0), dtype=np.float32), 0
    return embed_new_requests.fn(
        db_url, [r.id for r in answered], [r.prompt for r in answered], m.embedding_model, m.embedding_max_tokens
    )
