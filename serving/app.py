"""The Ray Serve application: an OpenAI-shaped HTTP ingress in front of a batched model.

    Gateway (FastAPI ingress, 1 replica)  →  ChatModel (adapter on its base, N replicas)

`build_app(spec)` returns the bound application; the deploy task runs it with `serve.run`.
"""

# No `from __future__ import annotations`: FastAPI must see the request models as classes
# through Serve's ingress wrapper.
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServeSpec:
    """Everything a deployment needs, resolved by the deploy task from config + registry."""

    model_name: str
    model_uri: str  # models:/name/version
    version: str
    tracking_uri: str
    inference_db_url: str
    num_replicas: int = 2
    replica_cpus: float = 0.5
    torch_threads: int = 1
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    default_max_tokens: int = 32
    max_tokens_limit: int = 256


@dataclass
class GenerationRequest:
    messages: list[dict[str, str]]
    max_tokens: int


@serve.deployment(
    health_check_period_s=10,
    max_constructor_retry_count=3,  # a version that cannot load fails fast; the old one keeps serving
    max_surge_percent=100,  # start the new replicas before the old ones stop
)
class ChatModel:
    """A LoRA adapter from the MLflow registry on its verified base model."""

    def __init__(self, spec: ServeSpec) -> None:
        import mlflow
        import torch

        from tuneloop.models import find_artifact_dir, load_adapter_model

        torch.set_num_threads(spec.torch_threads)
        mlflow.set_tracking_uri(spec.tracking_uri)
        local = mlflow.artifacts.download_artifacts(artifact_uri=spec.model_uri)
        self.model, self.tokenizer = load_adapter_model(find_artifact_dir(local))
        self.version = spec.version
        self.generate.set_max_batch_size(spec.max_batch_size)
        self.generate.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[GenerationRequest]) -> list[dict[str, Any]]:
        from tuneloop.generation import generate_batch

        longest = max(r.max_tokens for r in requests)
        # Greedy decoding is per row, so one batch at the longest budget, cut per request,
        # answers each request as if alone.
        outs = await asyncio.to_thread(
            generate_batch, self.model, self.tokenizer, [r.messages for r in requests], longest
        )
        results = []
        for req, out in zip(requests, outs):
            tokens = min(out.completion_tokens, req.max_tokens)
            text = out.text
            finish = out.finish_reason
            if out.completion_tokens > req.max_tokens:
                ids = self.tokenizer(out.text, add_special_tokens=False)["input_ids"][: req.max_tokens]
                text, finish = self.tokenizer.decode(ids, skip_special_tokens=True), "length"
            results.append({"text": text, "prompt_tokens": out.prompt_tokens,
                            "completion_tokens": tokens, "finish_reason": finish, "version": self.version})
        return results

    async def __call__(self, request: GenerationRequest) -> dict[str, Any]:
        return await self.generate(request)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=32_000)


class ChatCompletionRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # accepted; decoding is greedy
    stream: Literal[False] = False


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": None}})


api = FastAPI(title="tuneloop", description="OpenAI-compatible chat completions of tuneloop models")


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    return _error(422, f"Invalid request: {param or 'body'}: {first['msg']}", "invalid_request_error", param)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Gateway:
    """HTTP API: routes chat requests to the model and logs every request."""

    def __init__(self, model: DeploymentHandle, spec: ServeSpec) -> None:
        from tuneloop.inferencelog import InferenceLog

        self.model = model
        self.spec = spec
        self.log = InferenceLog(spec.inference_db_url)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.spec.model_name, "object": "model",
                                            "owned_by": "tuneloop", "version": self.spec.version}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> JSONResponse:
        from tuneloop.inferencelog import InferenceRecord

        if body.model not in (None, self.spec.model_name):
            return _error(404, f"Model {body.model!r} is not served here; use {self.spec.model_name!r}",
                          "invalid_request_error", "model")
        max_tokens = body.max_tokens or self.spec.default_max_tokens
        if max_tokens > self.spec.max_tokens_limit:
            return _error(422, f"max_tokens={max_tokens} is above this server's limit of "
                               f"{self.spec.max_tokens_limit}", "invalid_request_error", "max_tokens")
        messages = [m.model_dump() for m in body.messages]
        prompt = messages[-1]["content"]
        start = time.perf_counter()
        record = InferenceRecord(route="/v1/chat/completions", model=self.spec.model_name, prompt=prompt, status=200)
        try:
            out = await self.model.remote(GenerationRequest(messages, max_tokens))
        except Exception as err:  # the client gets a clean 503, the log gets the failure
            log.exception("generation failed")
            record.status, record.latency_ms = 503, (time.perf_counter() - start) * 1000
            await asyncio.to_thread(self.log.append, record)
            return _error(503, f"The model could not answer: {type(err).__name__}", "server_error")
        record.latency_ms = (time.perf_counter() - start) * 1000
        record.response, record.model_version = out["text"], out["version"]
        record.prompt_tokens, record.completion_tokens = out["prompt_tokens"], out["completion_tokens"]
        await asyncio.to_thread(self.log.append, record)
        return JSONResponse({
            "id": f"chatcmpl-{record.id}", "object": "chat.completion", "created": int(time.time()),
            "model": self.spec.model_name, "system_fingerprint": f"v{out['version']}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "finish_reason": out["finish_reason"]}],
            "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                      "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
        }, headers={"x-request-id": record.id})


def build_app(spec: ServeSpec) -> serve.Application:
    """Bind the application for one model version."""
    model = ChatModel.options(
        num_replicas=spec.num_replicas,
        ray_actor_options={"num_cpus": spec.replica_cpus},
    ).bind(spec)  # Serve versions deployments by their arguments: a new spec rolls replicas
    return Gateway.bind(model, spec)
