"""Retrieval-augmented rendering, the same in serving, evaluation and training:

    retriever = Retriever(paths.collections)
    turns, hits = retriever.render(spec, messages, values)   # spec binds retrieval: {collection, k}

The query is the client's last user message; the `k` most similar chunks of the bound
collection fill the prompt's `{{context}}`, numbered `[1] …` in order of similarity, so an answer
can cite them and a reader can check it. A prompt version that binds no collection renders as
before (no hits). The embedder is loaded once per process; a store is reopened only when an
ingest has changed it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from tuneloop.embedder import load_embedder
from tuneloop.prompts import PromptSpec, PromptVariablesError
from tuneloop.vectorstore import CollectionStore, Hit, Location, is_server

EMBED_MAX_TOKENS = 512  # as ingestion embeds chunks (the embedder's own cut-off applies below)


def format_context(hits: Sequence[Hit]) -> str:
    return "\n\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, 1))


def last_user_message(messages: Sequence[Mapping[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


class Retriever:
    """Collections of one location (a folder, or a pgvector server), opened on first use; thread-safe
    (the gateway calls it from threads)."""

    def __init__(self, location: Location) -> None:
        self.location: Location = location if is_server(location) else Path(location)
        self._stores: dict[str, tuple[float, CollectionStore]] = {}
        self._lock = threading.Lock()

    def store(self, name: str) -> CollectionStore:
        """The collection, opened again when an ingest has written it since (every ingest rewrites
        its metadata file): a long-lived gateway answers from the newest version, not the one it
        first opened."""
        with self._lock:
            written = CollectionStore.written(self.location, name)
            cached = self._stores.get(name)
            if cached is None or cached[0] != written:
                self._stores[name] = (written, CollectionStore.open(self.location, name))
            return self._stores[name][1]

    def search(self, collection: str, query: str, k: int) -> list[Hit]:
        store = self.store(collection)
        vector = load_embedder(store.meta["embedder"], EMBED_MAX_TOKENS)([query])[0]
        return store.search(vector, k)

    def render(
        self, spec: PromptSpec, messages: Sequence[Mapping[str, str]], values: Mapping[str, str] | None = None
    ) -> tuple[list[dict[str, str]], list[Hit]]:
        """The conversation the model sees and the chunks retrieved for it (none without retrieval)."""
        if spec.retrieval is None:
            return spec.render(messages, values), []
        query = last_user_message(messages)
        if not query.strip():
            raise PromptVariablesError(f"The prompt {spec.ref} retrieves for the user's message, and there is none")
        hits = self.search(spec.retrieval.collection, query, spec.retrieval.k)
        return spec.render(messages, values, format_context(hits)), hits


def render_prompt(
    spec: PromptSpec,
    messages: Sequence[Mapping[str, str]],
    values: Mapping[str, str] | None,
    retriever: Retriever | None,
) -> list[dict[str, str]]:
    """`spec.render`, retrieving its context first when it binds a collection (evaluation, training)."""
    if spec.retrieval is None:
        return spec.render(messages, values)
    if retriever is None:
        raise PromptVariablesError(
            f"The prompt {spec.ref} retrieves from {spec.retrieval.collection}: no collections here"
        )
    return retriever.render(spec, messages, values)[0]


def rendering_key(spec: PromptSpec | None, retriever: Retriever | None) -> str:
    """What retrieval adds to a prompt's rendering identity: the bound collection's version (its
    chunks changed: the same question gets other context)."""
    if spec is None or spec.retrieval is None or retriever is None:
        return ""
    return f"{spec.retrieval.collection}@{retriever.store(spec.retrieval.collection).version}"
