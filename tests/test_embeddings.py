"""Prompt embeddings are computed once per request and read back from the log's database."""

import numpy as np
import pytest

from tasks.embeddings import embed_missing, embedder_key, load_embedder
from tuneloop.inferencelog import InferenceLog


class CountingEmbedder:
    """A deterministic stand-in that records every text it embeds."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.texts.extend(texts)
        rng = np.random.default_rng([sum(map(ord, t)) for t in texts])
        v = rng.normal(size=(len(texts), 6)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_second_pass_embeds_nothing_new(tmp_path) -> None:
    store = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    embed = CountingEmbedder()
    ids, prompts = [f"r{i}" for i in range(10)], [f"prompt {i}" for i in range(10)]
    assert embed_missing(store, ids[:6], prompts[:6], "m@128", embed, chunk=4) == 6
    first = store.embeddings(ids[:6], "m@128")
    # The next window overlaps the last: only its 4 new requests are embedded.
    assert embed_missing(store, ids, prompts, "m@128", embed) == 4
    assert embed_missing(store, ids, prompts, "m@128", embed) == 0
    assert len(embed.texts) == 10 and sorted(embed.texts) == sorted(prompts)
    vectors = store.embeddings(ids, "m@128")
    assert vectors.shape == (10, 6) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[:6], first)  # stored bytes read back exactly
    # Another embedder keeps rows of its own.
    assert store.missing_embeddings(ids, "other@128") == ids
    assert store.embedding_count("m@128") == 10
    store.close()


def test_a_vector_stored_meanwhile_is_kept_and_missing_ones_are_named(tmp_path) -> None:
    store = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    store.add_embeddings(["a"], "m", np.ones((1, 3), np.float32))
    store.add_embeddings(["a", "b"], "m", np.zeros((2, 3), np.float32))  # "a" was added by another run: kept
    np.testing.assert_array_equal(store.embeddings(["b", "a"], "m"), [[0, 0, 0], [1, 1, 1]])
    with pytest.raises(KeyError, match="1 requests have no m embedding"):
        store.embeddings(["a", "c"], "m")
    store.close()


def test_the_packaged_minilm_embeds_unit_vectors() -> None:
    embed = load_embedder("builtin:all-minilm-l6-v2", 128)
    assert load_embedder("builtin:all-minilm-l6-v2", 128) is embed  # loaded once per process
    v = embed(["What is the capital of France?", "Which city is France's capital?", "How does warfarin work?"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3  # paraphrases sit closer than another topic
    assert embedder_key("builtin:all-minilm-l6-v2", 128) == "builtin:all-minilm-l6-v2@128"
