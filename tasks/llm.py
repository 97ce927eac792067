"""Other models the loop asks: the judge of evaluations and the teacher of retraining.

    backend = open_backend(cfg.eval.judge, models_dir, "eval.judge")     # or cfg.monitor.teacher
    backend.complete(["prompt 1", "prompt 2"], system="Answer in one word.")  # text, or the error per prompt

A backend is a local model (a path, hub id or builtin, greedy decoding) or any OpenAI-compatible
chat completions endpoint (tuneloop's own serves one); both answer a list of prompts, each
answer the text or the error that kept it from coming.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import httpx

ENDPOINT_WORKERS = 8  # concurrent requests; a batching server (tuneloop's) answers them together


class ModelUnavailable(RuntimeError):
    """A model that cannot be loaded or reached: raised before any generation."""


class ModelSettings(Protocol):
    """What a backend reads of its config section (JudgeConfig, TeacherConfig)."""

    backend: str
    model: str
    base_url: str | None
    api_key_env: str | None
    max_new_tokens: int
    timeout_s: float


class Backend(Protocol):
    def complete(self, prompts: list[str], system: str | None = None) -> list[str | Exception]:
        """Return the model's answer to each prompt, or the error that kept it from answering."""
        ...


def _chat(prompt: str, system: str | None) -> list[dict[str, str]]:
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]


class LocalBackend:
    """A model on this machine: a path, hub id or builtin (tuneloop.models), greedy decoding."""

    def __init__(self, cfg: ModelSettings, models_dir: Path, batch_size: int = 8, role: str = "") -> None:
        from tuneloop.models import BaseModelError, load_base, resolve_base

        try:
            self.model, self.tokenizer = load_base(resolve_base(cfg.model, models_dir))
        except (BaseModelError, OSError) as err:
            raise ModelUnavailable(f"{_noun(role, 'model')} {cfg.model!r} cannot be loaded: {err}") from err
        self.model.eval()
        self.max_new_tokens, self.batch_size = cfg.max_new_tokens, batch_size

    def complete(self, prompts: list[str], system: str | None = None) -> list[str | Exception]:
        from tuneloop.generation import generate_batch

        answers: list[str | Exception] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i : i + self.batch_size]
            try:
                outs = generate_batch(
                    self.model, self.tokenizer, [_chat(p, system) for p in chunk], self.max_new_tokens
                )
                answers += [o.text for o in outs]
            except (RuntimeError, ValueError) as err:  # e.g. out of memory mid-run: mark these prompts
                answers += [err] * len(chunk)
        return answers


class EndpointBackend:
    """Any OpenAI-compatible chat completions API (`<base_url>/chat/completions`), tuneloop's included."""

    def __init__(self, cfg: ModelSettings, setting: str, role: str = "") -> None:
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ModelUnavailable(
                    f"{setting}.api_key_env names {cfg.api_key_env}, which is not set in this "
                    "environment: export it, or set api_key_env to null"
                )
            headers["authorization"] = f"Bearer {key}"
        self.setting, self.noun = setting, _noun(role, "endpoint")
        self.url = f"{str(cfg.base_url).rstrip('/')}/chat/completions"
        self.model, self.max_new_tokens = cfg.model, cfg.max_new_tokens
        self.client = httpx.Client(timeout=cfg.timeout_s, headers=headers)

    def ask(self, content: str, max_tokens: int, system: str | None = None) -> str:
        r = self.client.post(
            self.url,
            json={"model": self.model, "max_tokens": max_tokens, "temperature": 0, "messages": _chat(content, system)},
        )
        r.raise_for_status()
        answer = r.json()["choices"][0]["message"]["content"]
        if not isinstance(answer, str):
            raise TypeError(f"choices[0].message.content is {type(answer).__name__}, not text")
        return answer

    def probe(self) -> None:
        """Ask one tiny question; raise ModelUnavailable saying what is wrong if no proper answer comes."""
        try:
            self.ask("Reply with the word OK.", 4)
        except httpx.HTTPStatusError as err:
            raise ModelUnavailable(
                f"{self.noun} {self.url} answered HTTP {err.response.status_code}: {err.response.text[:300]} "
                f"(check {self.setting}.model and {self.setting}.api_key_env)"
            ) from err
        except httpx.HTTPError as err:
            raise ModelUnavailable(
                f"{self.noun} {self.url} cannot be reached ({type(err).__name__}: {err}); "
                f"start it or fix {self.setting}.base_url"
            ) from err
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ModelUnavailable(
                f"{self.noun} {self.url} did not answer like an OpenAI chat completions "
                f"API ({type(err).__name__}: {err})"
            ) from err

    def complete(self, prompts: list[str], system: str | None = None) -> list[str | Exception]:
        def one(prompt: str) -> str | Exception:
            try:
                return self.ask(prompt, self.max_new_tokens, system)
            except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as err:
                return err

        with ThreadPoolExecutor(ENDPOINT_WORKERS) as pool:
            return list(pool.map(one, prompts))


def _noun(role: str, what: str) -> str:
    return f"{role} {what}" if role else what.capitalize()  # "Judge model", or "Model"


def open_backend(cfg: ModelSettings, models_dir: Path, setting: str, role: str = "") -> Backend:
    """Load the local model or reach the endpoint (one probe question); raise ModelUnavailable if not.
    `role` ("Judge", "Teacher") names the model in the messages."""
    if cfg.backend == "local":
        return LocalBackend(cfg, models_dir, role=role)
    if cfg.backend == "openai":
        backend = EndpointBackend(cfg, setting, role)
        backend.probe()
        return backend
    raise ModelUnavailable(f"{setting}.backend is {cfg.backend!r}: there is no model to open")
