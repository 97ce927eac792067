"""The Ray Serve application: an OpenAI-compatible HTTP gateway in front of batched, multi-LoRA
model replicas.

    Gateway (FastAPI ingress: auth, limits, routing, inference log)
        →  ModelServer (a base model with LoRA adapters, N replicas, serving/engine.py)

Routes: POST /v1/chat/completions and /v1/completions (plain or streamed as server-sent
events), GET /v1/models, POST /v1/feedback, GET /healthz (live), GET /readyz (a replica
answers). Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
Every answer passes the route's output guardrails (serving/guardrails.py) before the client
sees it: PII redacted or blocked, toxic answers blocked (`finish_reason: content_filter`) or
flagged, streams included.

What changes at run time is each deployment's `user_config` (Serve calls `reconfigure`
on the running replicas, no restart):

    ModelServer: {"adapters": {"3": "models:/tuneloop/3", "4": "models:/tuneloop/4"}, "default": "3"}
    Gateway:     {"champion": "3", "challenger": "4", "mode": "canary", "share": 0.1}

`model` in a request is the served name (routed: the champion, or the challenger for a
canary share of requests) or `name:VERSION` (that loaded version). In shadow mode the
challenger answers a copy of each routed request; its answer is logged, never returned.

`app_builder` builds the application from a Serve config file (`serve deploy
infra/serve/serve-config.yaml`); the deploy task writes the same config.
"""

# No `from __future__ import annotations`: FastAPI must see the request models as classes
# through Serve's ingress wrapper.
import asyncio
import dataclasses
import datetime as dt
import json
import logging
import math
import random
import re
import time
import uuid
from collections import Counter
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import ModelServer
from serving.guard import KeyEntry, KeyRing, RateLimiter, TokenBudgets
from serving.guardrails import Checked, OutputGuard
from tuneloop.prompts import PromptSpec, PromptVariablesError
from tuneloop.retrieval import Retriever, format_context, last_user_message
from tuneloop.seams import Answer, GenerationRequest, Refusal, Routing, Sampling, ServeSpec
from tuneloop.vectorstore import CollectionError

log = logging.getLogger("ray.serve")

ARMS = ("champion", "challenger", "shadow", "pinned")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_text(value: str) -> str:
    """Refuse what JSON can carry but is not Unicode text: a lone UTF-16 surrogate (`"\\ud800"`).
    No tokenizer, database or redactor downstream can take it, so it gets a 422 here."""
    found = _SURROGATE.search(value)
    if found:
        raise ValueError(
            f"holds a lone UTF-16 surrogate (U+{ord(found.group()):04X}) at character {found.start()}: not Unicode text"
        )
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]


class Message(BaseModel):
    # `developer`: OpenAI's name for system instructions in newer models; rendered as `system`.
    role: Literal["system", "developer", "user", "assistant"]
    content: Text


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model: Text | None = Field(None, description="The served name (routed: champion or canary) or `name:VERSION`")
    max_tokens: int | None = Field(None, ge=1, description="Up to serve.max_tokens_limit (422 above)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="Extension (vLLM's): sample among the k most likely; 0: all")
    seed: int | None = Field(None, description="Same seed, prompt and version: the same tokens")
    stop: Text | list[Text] | None = Field(None, description="Up to 4 strings that end the answer (not returned)")
    n: int = Field(1, ge=1, description="Choices to return (at most serve.max_n)")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (400) unless empty")
    stream: bool = Field(False, description="Server-sent events (not with n > 1 or logprobs: 400)")
    stream_options: StreamOptions | None = Field(None, description="`include_usage`: a last chunk with usage")
    user: Text | None = Field(None, max_length=256, description="Keeps a user on one canary arm")


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(
        ..., min_length=1, description="Roles system, developer (as system), user, assistant"
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="As max_tokens (takes precedence)")
    logprobs: bool = Field(False, description="Each answer token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="0-20 likeliest alternatives per token")
    response_format: dict[str, Any] | None = Field(
        None, description="text, json_object or json_schema: JSON by constrained decoding (xgrammar)"
    )
    prompt_variables: dict[str, Text] | None = Field(
        None, description="Extension: the bound prompt version's variables (see /v1/models); 400 when they do not fit"
    )


class CompletionRequest(_Common):
    prompt: Text | list[Text] = Field(..., description="One prompt (a list of one); control tokens in it are kept")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of the k most likely tokens")


class FeedbackRequest(BaseModel):
    id: Text = Field(..., min_length=1, max_length=64, description="The response id (or x-request-id)")
    score: float = Field(..., ge=0, le=1, description="0 (bad) … 1 (good)")
    comment: Text | None = Field(None, max_length=4000)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


_STATUS = {
    400: "Invalid JSON, a setting this server does not honour, or a prompt over the context limit",
    401: "Missing or invalid API key",
    403: "The key lacks the scope this route needs",
    404: "Unknown model or version, or no such response",
    413: "Request body over serve.max_request_bytes",
    422: "A field out of range or of the wrong type, or text that is not Unicode",
    429: "Rate limit reached (see Retry-After)",
    503: "No model replica could answer; retry later",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses a route documents in /openapi.json."""
    return {code: {"model": ErrorBody, "description": _STATUS[code]} for code in codes}


GENERATE_ERRORS = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events (chunks, then `data: [DONE]`)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **_errors(400, 401, 403, 404, 413, 422, 429, 503),
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={"error": {"message": message, "type": kind, "param": param, "code": code}},
    )


api = FastAPI(
    title="tuneloop", description="OpenAI-compatible completions of tuneloop models", docs_url=None, redoc_url=None
)
api.state.max_request_bytes = 256_000  # the Gateway sets its spec's limit when its replica starts


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.kind, exc.param, exc.code, exc.headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return _error(
            400,
            f"The body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            "invalid_request_error",
            None,
            "invalid_json",
        )
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    return _error(422, f"Invalid request: {param or 'body'}: {first['msg']}", "invalid_request_error", param)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(exc.status_code, str(exc.detail), kind)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # never a stack trace to clients
    log.exception("unexpected error on %s", request.url.path)
    return _error(500, f"Internal error ({type(exc).__name__}); the server log has the details", "server_error")


@api.middleware("http")
async def _limit_body(request: Request, call_next: Any) -> Any:
    """413 before anything reads the body: by Content-Length, or while a chunked body arrives."""
    limit = request.app.state.max_request_bytes  # the gateway replica's spec (one app per replica process)
    length = request.headers.get("content-length")
    too_big = _error(
        413,
        f"Request body is over this server's limit of {limit} bytes",
        "invalid_request_error",
        None,
        "request_too_large",
    )
    if length is not None:
        if length.isdigit() and int(length) > limit:
            return too_big
    elif request.method == "POST" and len(await request.body()) > limit:  # chunked: Starlette keeps the body
        return too_big
    return await call_next(request)


def compatibility_table() -> str:
    """README's table of the OpenAI parameters, from the request models themselves (so it cannot drift)."""
    lines = ["| route | parameter | here |", "|---|---|---|"]
    for route, model in (("chat", ChatCompletionRequest), ("completions", CompletionRequest)):
        for name, field in model.model_fields.items():
            note = (field.description or "supported").replace("|", "\\|")
            lines.append(f"| {route} | `{name}` | {note} |")
    return "\n".join(lines) + "\n"


def _choices(req: GenerationRequest, n: int) -> list[GenerationRequest]:
    """`n` requests for `n` choices: a seeded request's choice i draws with seed + i."""
    seed = req.sampling.seed
    return [
        req
        if i == 0
        else dataclasses.replace(
            req, sampling=dataclasses.replace(req.sampling, seed=None if seed is None else seed + i)
        )
        for i in range(n)
    ]


def _actions(checks: list[Checked]) -> str | None:
    """The log's `guardrail` column: every action taken on any choice, comma-separated."""
    return ",".join(sorted({a for c in checks for a in c.actions})) or None


def _citations(record: Any) -> dict[str, Any]:
    """The `citations` extension: the chunks the answer's context held, `[n]` in the context being
    `citations[n-1]` (id, source, position, score); only where the prompt version retrieves."""
    return {"citations": json.loads(record.retrieved)} if getattr(record, "retrieved", None) else {}


def _filtered(check: Checked) -> dict[str, Any]:
    """A choice's `content_filter_results` extension (Azure OpenAI's name), only when a guardrail acted."""
    results = check.filter_results()
    return {"content_filter_results": results} if results is not None else {}


def _usage(answers: list[Answer]) -> dict[str, int]:
    completion = sum(a.completion_tokens for a in answers)
    prompt = answers[0].prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}


def _chat_logprobs(answer: Answer) -> dict[str, Any] | None:
    """OpenAI's chat `logprobs`: per token, its log-probability and the top alternatives."""
    if answer.logprobs is None:
        return None
    return {
        "content": [
            {**_token_entry(t.token, t.logprob), "top_logprobs": [_token_entry(tok, lp) for tok, lp in t.top]}
            for t in answer.logprobs
        ],
        "refusal": None,
    }


def _completion_logprobs(answer: Answer) -> dict[str, Any] | None:
    """The completions API's (legacy) `logprobs`: tokens, their log-probabilities, top alternatives, offsets."""
    if answer.logprobs is None:
        return None
    offsets, at = [], 0
    for t in answer.logprobs:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in answer.logprobs],
        "token_logprobs": [t.logprob for t in answer.logprobs],
        "top_logprobs": [dict(t.top) for t in answer.logprobs],
        "text_offset": offsets,
    }


def check_exposure(host: str, require_key: bool, have_keys: bool) -> None:
    """Refuse to serve beyond loopback (or with keys required) when no key is configured."""
    if have_keys:
        return
    if host not in LOOPBACK:
        raise RuntimeError(
            f"The gateway's HTTP proxy listens on {host!r}, beyond loopback, and no API key is configured: set "
            "serve.api_keys or the serve.api_keys_env variable (`tuneloop api-key new`)"
        )
    if require_key:
        raise RuntimeError("serve.require_api_key is on and no API key is configured (serve.api_keys_env)")


def _proxy_host() -> str:
    """The address Serve's HTTP proxies listen on (unknown counts as exposed)."""
    try:
        from ray.serve.context import _get_global_client

        return str(_get_global_client().http_config.host)
    except Exception:  # noqa: BLE001 - no controller to ask: assume the worst
        return "unknown"


def _retryable(err: BaseException) -> bool:
    """A replica that died or vanished mid-request: another replica may answer."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(err, (ActorDiedError, ActorUnavailableError, RayActorError))


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=512,
    max_surge_percent=100,
    health_check_period_s=10,
)
@serve.ingress(api)
class Gateway:
    """HTTP API: checks keys and limits, routes to a model version, logs every request."""

    def __init__(self, model: DeploymentHandle, spec: ServeSpec) -> None:
        from tuneloop.inferencelog import InferenceLog, LogWriter

        self.model = model
        self.stream_handle = model.options(stream=True)
        spec = ServeSpec.model_validate(spec)
        self.spec = spec.gateway
        self.name = spec.model_name
        self.store = InferenceLog(spec.inference_db_url)
        root = self.spec.collections_root
        self.retriever = Retriever(root) if root else None  # opens a collection on its first use
        self.writer = LogWriter(self.store, redact=self._redactor())
        self.keys = KeyRing([k.model_dump() for k in self.spec.api_keys], self.spec.api_keys_file)
        self.require_key = self.spec.require_api_key or bool(self.keys)
        check_exposure(_proxy_host(), self.require_key, bool(self.keys))
        self.refused: Counter[str] = Counter()  # auth and rate refusals: counted, never logged with their prompts
        self.budgets = TokenBudgets()
        self.limiter = RateLimiter(self.spec.rate_per_minute, self.spec.burst)
        self.routing = Routing()
        self._shadow_tasks: set[asyncio.Task] = set()
        api.state.max_request_bytes = self.spec.max_request_bytes
        rails = self.spec.guardrails
        self.guards = {"chat": OutputGuard(rails.chat), "completions": OutputGuard(rails.completions)}
        for guard in self.guards.values():
            guard.warm_up()
        self.guarded: Counter[str] = Counter()  # guardrail actions, by action

    def _guard(self, route: str) -> OutputGuard:
        return self.guards["chat" if route.endswith("chat/completions") else "completions"]

    def _check(self, route: str, answers: list[Answer]) -> list[Checked]:
        """Run the route's guardrails over each choice (in a thread: presidio and the classifier are CPU)."""
        guard = self._guard(route)
        checks = [guard.check(a.text) for a in answers]
        for c in checks:
            self.guarded.update(c.actions)
        return checks

    def _redactor(self) -> Any:
        if self.spec.log_pii != "redact":
            return None
        from tuneloop.safety import NER_ENTITIES, PiiScanner, ner_available

        entities = list(self.spec.pii_entities)
        if not ner_available() and set(entities) & set(NER_ENTITIES):
            log.warning("No spaCy model: %s are not redacted from the log", sorted(set(entities) & set(NER_ENTITIES)))
            entities = [e for e in entities if e not in NER_ENTITIES]
        scanner = PiiScanner(entities)
        scanner.redact(["warm-up: alice@example.com"])  # load presidio now, not with the first rows
        return scanner.redact

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        routing = Routing.model_validate(user_config or {})  # a bad table fails the update, the old one stays
        self.routing = routing
        log.info("Routing: %s", routing)

    def __del__(self) -> None:
        self.writer.close()  # Serve calls this on shutdown: log rows still queued are written

    # ------------------------------------------------------------------ checks

    def _authorize(self, request: Request, *scopes: str) -> KeyEntry:
        """Return the caller (its key, or the client address on an open loopback gateway) after
        checking its key, one of `scopes` (default: infer) and its rate; raise 401 / 403 / 429.
        Refusals are counted here and never reach the inference log."""
        if self.require_key:
            header = request.headers.get("authorization", "")
            key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
            entry = self.keys.identify(key) if key else None
            if entry is None:
                self.refused["invalid_api_key"] += 1
                raise ApiError(
                    401,
                    "Missing or invalid API key: send `Authorization: Bearer <key>`",
                    "authentication_error",
                    None,
                    "invalid_api_key",
                )
        else:
            entry = KeyEntry(f"client:{request.client.host if request.client else 'unknown'}", "", None, ("infer",))
        wanted = scopes or ("infer",)
        if not any(entry.may(s) for s in wanted):
            self.refused["forbidden"] += 1
            raise ApiError(
                403,
                f"The key {entry.id!r} lacks the {' or '.join(wanted)} scope (it has {', '.join(entry.scopes)})",
                "permission_error",
                None,
                "insufficient_scope",
            )
        wait = self.limiter.take(entry.id, entry.rate_per_minute)
        if wait > 0:
            self.refused["rate_limit_exceeded"] += 1
            raise ApiError(
                429,
                f"Rate limit reached for {entry.id}: retry in {math.ceil(wait)} s",
                "rate_limit_error",
                None,
                "rate_limit_exceeded",
                {"Retry-After": str(math.ceil(wait))},
            )
        return entry

    async def _check_budget(self, caller: KeyEntry) -> None:
        """429 once a key with a daily token budget has spent it (counted, not logged)."""
        if caller.tokens_per_day is None:
            return
        if not self.budgets.known(caller.id):
            today = dt.datetime.strptime(self.budgets.today(), "%Y-%m-%d").replace(tzinfo=dt.UTC)
            used = await asyncio.to_thread(self.store.usage, caller.id, today)
            self.budgets.seed(caller.id, sum(d["prompt_tokens"] + d["completion_tokens"] for d in used.values()))
        spent = self.budgets.spent(caller.id)
        if spent >= caller.tokens_per_day:
            self.refused["token_budget_exceeded"] += 1
            raise ApiError(
                429,
                f"The key {caller.id!r} has used its {caller.tokens_per_day} tokens for today ({spent} used); "
                "the budget renews at 00:00 UTC",
                "rate_limit_error",
                None,
                "token_budget_exceeded",
            )

    def _max_tokens(self, *values: int | None) -> int:
        asked = next((v for v in values if v is not None), None)
        max_tokens = asked or self.spec.default_max_tokens
        if max_tokens > self.spec.max_tokens_limit:
            raise ApiError(
                422,
                f"max_tokens={max_tokens} is above this server's limit of {self.spec.max_tokens_limit}",
                "invalid_request_error",
                "max_tokens",
            )
        return max_tokens

    def _sampling(self, body: Any, chat: bool) -> Sampling:
        """The request's decoding settings; a 400 names any setting this server does not honour."""

        def unsupported(param: str, what: str) -> ApiError:
            return ApiError(
                400, f"{param}: {what} is not supported here", "invalid_request_error", param, "unsupported"
            )

        for param in ("presence_penalty", "frequency_penalty"):
            if getattr(body, param):
                raise unsupported(param, "a non-zero penalty")
        if body.logit_bias:
            raise unsupported("logit_bias", "a logit bias")
        schema = self._json_schema(body.response_format) if chat else None
        if schema is not None and body.stop:
            raise unsupported("stop", "a stop string with a JSON response_format (it could cut the JSON)")
        if body.n > self.spec.max_n:
            raise ApiError(
                422, f"n={body.n} is above this server's limit of {self.spec.max_n}", "invalid_request_error", "n"
            )
        if body.n > 1 and body.stream:
            raise unsupported("n", "more than one choice in a stream")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or not all(stop):
            raise ApiError(422, "stop: up to 4 non-empty strings", "invalid_request_error", "stop")
        if chat:
            if body.top_logprobs and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_request_error", "top_logprobs")
            logprobs, top = body.logprobs, body.top_logprobs or 0
        else:
            logprobs, top = body.logprobs is not None, body.logprobs or 0
        if logprobs and body.stream:
            raise unsupported("logprobs", "log-probabilities in a stream")
        return Sampling(
            temperature=body.temperature or 0.0,
            top_p=body.top_p or 1.0,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=stop,
            logprobs=logprobs,
            top_logprobs=top,
            json_schema=schema,
        )

    def _json_schema(self, response_format: dict[str, Any] | None) -> str | None:
        """The JSON schema constrained decoding follows: `json_object` (any object) or
        `json_schema` (its `schema`); None for text."""

        def bad(message: str) -> ApiError:
            return ApiError(400, f"response_format: {message}", "invalid_request_error", "response_format")

        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return '{"type": "object"}'
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise bad("json_schema needs {'name': ..., 'schema': {...}}")
            return json.dumps(spec["schema"])
        raise bad(f"type {kind!r} is not one of text, json_object, json_schema")

    def _route(self, model: str | None, user: str | None) -> tuple[str | None, str, PromptSpec | None]:
        """Return (version or None for the replicas' default, arm, the chat route's prompt version)."""
        r = self.routing
        if model in (None, self.name):
            if r.mode == "canary" and (r.challenger or r.challenger_prompt):
                draw = (int(uuid.uuid5(uuid.NAMESPACE_URL, user).int % 10_000) / 10_000) if user else random.random()
                if draw < r.share:
                    return self._challenger(), "challenger", r.challenger_prompt or r.prompt
            return r.champion, "champion", r.prompt
        name, _, version = model.partition(":")
        if name == self.name and version:
            return version.removeprefix("v"), "pinned", r.prompt
        raise ApiError(
            404,
            f"The model {model!r} does not exist here; use {self.name!r} or '{self.name}:<version>' (see /v1/models)",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    def _challenger(self) -> str | None:
        """The challenger arm's model version: the champion's in a prompt-only comparison."""
        return self.routing.challenger or self.routing.champion

    @staticmethod
    def _rendered(
        prompt: PromptSpec | None, messages: list[dict], variables: dict[str, str] | None
    ) -> tuple[tuple[str, str], ...]:
        """The turns the model sees: the bound prompt filled, the client's messages in it; 400 when the
        request's `prompt_variables` do not fit the prompt."""
        if prompt is None:
            if variables:
                raise ApiError(
                    400,
                    "This route binds no prompt version: prompt_variables has nothing to fill",
                    "invalid_request_error",
                    "prompt_variables",
                    "invalid_prompt_variables",
                )
            rendered = messages
        else:
            try:
                rendered = prompt.render(messages, variables or {})
            except PromptVariablesError as err:
                raise ApiError(
                    400, str(err), "invalid_request_error", "prompt_variables", "invalid_prompt_variables"
                ) from None
        return tuple(("system" if m["role"] == "developer" else m["role"], m["content"]) for m in rendered)

    async def _render(
        self, prompt: PromptSpec | None, messages: list[dict], variables: dict[str, str] | None, record: Any
    ) -> tuple[tuple[str, str], ...]:
        """`_rendered`, retrieving first when the prompt version binds a collection: the chunks fill its
        {{context}} and are recorded (ids, sources, scores) for the log and the response's citations."""
        if prompt is None or prompt.retrieval is None:
            return self._rendered(prompt, messages, variables)
        bound, query = prompt.retrieval, last_user_message(messages)
        unavailable = ("server_error", None, "retrieval_unavailable")
        if not query.strip():
            message = f"The prompt {prompt.ref} retrieves for the user's message, and there is none"
            raise ApiError(400, message, "invalid_request_error", "messages", "invalid_prompt_variables")
        if self.retriever is None:
            raise ApiError(503, "Retrieval is not configured on this gateway", *unavailable)
        try:
            prompt.check_variables(variables or {})
            hits = await asyncio.to_thread(self.retriever.search, bound.collection, query, bound.k)
        except PromptVariablesError as err:
            raise ApiError(
                400, str(err), "invalid_request_error", "prompt_variables", "invalid_prompt_variables"
            ) from None
        except CollectionError as err:
            log.error("retrieval for %s failed: %s", prompt.ref, err)
            message = f"The collection {bound.collection} cannot be searched now; retry later"
            raise ApiError(503, message, *unavailable) from None
        record.retrieved = json.dumps([h.cite() for h in hits])
        rendered = prompt.render(messages, variables or {}, format_context(hits))
        return tuple(("system" if m["role"] == "developer" else m["role"], m["content"]) for m in rendered)

    # ------------------------------------------------------------------ calls

    def _refused(self, refusal: Refusal, req: GenerationRequest) -> ApiError:
        """The client's 4xx for a request the engine will not answer."""
        if refusal.code == "prompt_too_long":
            return ApiError(400, refusal.message, "invalid_request_error", "messages", "context_length_exceeded")
        if refusal.code == "prompt_empty":
            return ApiError(400, refusal.message, "invalid_request_error", "prompt", "empty_prompt")
        if refusal.code == "bad_response_format":
            return ApiError(400, refusal.message, "invalid_request_error", "response_format", "invalid_schema")
        return ApiError(
            404,
            f"The model {self.name}:{req.version} is not loaded here (see /v1/models)",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    async def _answer(self, req: GenerationRequest) -> Answer:
        for attempt in range(2):
            try:
                out = await self.model.generate.remote(req)
            except Exception as err:
                if attempt == 0 and _retryable(err):
                    log.warning("replica lost during request %s (%s): retrying once", req.request_id, err)
                    continue
                raise
            if isinstance(out, Refusal):
                raise self._refused(out, req)
            return out
        raise RuntimeError("unreachable")

    def _record(
        self, route: str, prompt: str, key_id: str | None, arm: str | None, request: Request | None = None
    ) -> Any:
        from tuneloop.inferencelog import InferenceRecord

        record = InferenceRecord(route=route, model=self.name, prompt=prompt, status=200, key_id=key_id, arm=arm)
        # Serve's proxy gives every HTTP request an id (the client's `x-request-id`, or a new
        # one) and returns it as the `x-request-id` response header: the log row uses it.
        rid = request.headers.get("x-request-id", "") if request is not None else ""
        if 0 < len(rid) <= 36 and all(c.isalnum() or c in "-_." for c in rid):
            record.id = rid
        return record

    def _finish(
        self,
        record: Any,
        start: float,
        answer: Answer | None = None,
        error: ApiError | None = None,
        failure: BaseException | None = None,
    ) -> None:
        record.latency_ms = (time.perf_counter() - start) * 1000
        if answer is not None:
            record.response, record.model_version = answer.text, answer.version
            record.adapter = f"v{answer.version}"
            record.prompt_tokens, record.completion_tokens = answer.prompt_tokens, answer.completion_tokens
        if error is not None:
            record.status, record.error = error.status, error.message
        if failure is not None:
            record.status, record.error = 503, f"{type(failure).__name__}: {failure}"[:2000]
        self.writer.submit(record)  # returns at once: a thread writes the log

    async def _complete(
        self,
        route: str,
        body: Any,
        request: Request,
        messages: list[dict] | None,
        text: str | None,
        prompt: str,
        max_tokens_values: tuple,
    ) -> Any:
        start = time.perf_counter()
        caller = self._authorize(request)  # a refused caller's prompt is not logged
        await self._check_budget(caller)
        record = self._record(route, prompt, caller.id, None, request)
        try:
            max_tokens = self._max_tokens(*max_tokens_values)
            sampling = self._sampling(body, messages is not None)
            record.sampling = json.dumps({k: v for k, v in dataclasses.asdict(sampling).items() if v}) or None
            version, arm, bound = self._route(body.model, body.user)
            record.arm = arm
            chat = messages is not None
            variables = getattr(body, "prompt_variables", None)
            turns = await self._render(bound, messages, variables, record) if chat else None
            record.prompt_version = bound.ref if chat and bound else None
            req = GenerationRequest(version, max_tokens, turns, text, record.id, arm == "pinned", sampling)
            if body.stream:
                return await self._stream(route, req, record, start, body)
            answers = await asyncio.gather(*(self._answer(choice) for choice in _choices(req, body.n)))
            checks = await asyncio.to_thread(self._check, route, answers)
            record.guardrail = _actions(checks)
        except ApiError as err:
            self._finish(record, start, error=err)
            raise
        except asyncio.CancelledError:  # the client went away (Serve cancels its request): still logged
            self._finish(record, start, error=ApiError(499, "client closed the request", "client_closed", None))
            raise
        except Exception as err:  # the client gets a clean 503, the log gets the failure
            log.exception("generation failed")
            self._finish(record, start, failure=err)
            raise ApiError(
                503,
                f"The model could not answer ({type(err).__name__}); retry later",
                "server_error",
                None,
                "model_unavailable",
            ) from None
        self._finish(record, start, answers[0])  # the log keeps what the model wrote (redacted by the writer)
        self.budgets.add(caller.id, sum(a.prompt_tokens + a.completion_tokens for a in answers))
        r = self.routing
        if arm == "champion" and r.mode == "shadow" and (r.challenger or r.challenger_prompt):
            shadow_prompt = r.challenger_prompt or r.prompt
            shadow = dataclasses.replace(req, version=self._challenger(), pinned=False)
            if chat and r.challenger_prompt is not None:
                try:
                    shadow = dataclasses.replace(shadow, turns=self._rendered(shadow_prompt, messages, variables))
                except ApiError:  # the challenger prompt's variables do not fit: no shadow answer to compare
                    shadow = None
            if shadow is not None:
                self._shadow(route, shadow, prompt, shadow_prompt.ref if chat and shadow_prompt else None)
        return answers, record, checks

    def _shadow(self, route: str, req: GenerationRequest, prompt: str, prompt_version: str | None) -> None:
        """Ask the challenger the same thing in the background; log its answer as `shadow`."""

        async def run() -> None:
            start = time.perf_counter()
            record = self._record(route, prompt, None, "shadow")
            record.prompt_version = prompt_version
            try:
                answer = await self._answer(dataclasses.replace(req, request_id=record.id))
            except ApiError as err:
                self._finish(record, start, error=err)
            except Exception as err:  # noqa: BLE001 - a failed shadow answer is logged, never raised
                self._finish(record, start, failure=err)
            else:
                record.guardrail = _actions(await asyncio.to_thread(self._check, route, [answer]))
                self._finish(record, start, answer)

        task = asyncio.get_running_loop().create_task(run())
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _stream(self, route: str, req: GenerationRequest, record: Any, start: float, body: Any) -> Any:
        chat = route.endswith("chat/completions")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{record.id}"
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = self.stream_handle.stream.remote(req)
        first = await gen.__anext__()  # request-level refusals surface before any byte is sent
        if first.kind == "refused":
            raise self._refused(first.refusal, req)

        def chunk(delta: str | None, finish: str | None, version: str | None, usage: dict | None = None) -> str:
            if chat:
                choice = {
                    "index": 0,
                    "delta": (
                        {"role": "assistant", "content": delta}
                        if delta == "" and finish is None
                        else ({"content": delta} if delta else {})
                    ),
                    "finish_reason": finish,
                    "logprobs": None,
                }
                obj = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.name,
                    "system_fingerprint": f"v{version}" if version else None,
                    "choices": [choice],
                }
                if delta == "" and finish is None:  # the first chunk says what the context held
                    obj.update(_citations(record))
            else:
                obj = {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.name,
                    "system_fingerprint": f"v{version}" if version else None,
                    "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}],
                }
            if usage is not None:
                obj["choices"], obj["usage"] = [], usage
            return f"data: {json.dumps(obj)}\n\n"

        guard = self._guard(route).stream()

        def blocked() -> str:  # the first blocked span ends the stream: nothing of it is sent
            gen.cancel()  # and the replica stops decoding
            record.response, record.status = guard.text, 200
            record.guardrail = ",".join(guard.actions)
            self.guarded.update(guard.actions)
            return chunk(None, "content_filter", None)

        async def events() -> Any:
            answer: Answer | None = None
            logged = False
            try:
                yield chunk("", None, None)
                async for event in gen:
                    if event.kind == "delta":
                        visible = guard.feed(event.text)
                        if guard.blocked:
                            yield blocked()
                            break
                        if visible:
                            yield chunk(visible, None, None)
                    elif event.kind == "done":
                        answer = event.answer
                        visible = guard.feed(event.text) if event.text else ""
                        visible += guard.finish() if not guard.blocked else ""
                        if guard.blocked:
                            yield blocked()
                            break
                        if visible:
                            yield chunk(visible, None, answer.version)
                        record.guardrail = ",".join(guard.actions) or None
                        self.guarded.update(guard.actions)
                        yield chunk(None, answer.finish_reason, answer.version)
                if answer is not None and include_usage:
                    yield chunk(
                        None,
                        None,
                        answer.version,
                        {
                            "prompt_tokens": answer.prompt_tokens,
                            "completion_tokens": answer.completion_tokens,
                            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
                        },
                    )
                logged = True
                if answer is None:  # blocked mid-stream: the log row says so (tokens unknown)
                    record.latency_ms = (time.perf_counter() - start) * 1000
                    self.writer.submit(record)
                else:
                    self._finish(record, start, answer)
                if answer is not None and record.key_id:
                    self.budgets.add(record.key_id, answer.prompt_tokens + answer.completion_tokens)
                yield "data: [DONE]\n\n"
            except Exception as err:  # mid-stream: an error event, then the end; logged as failed
                log.exception("stream failed")
                logged = True
                self._finish(record, start, failure=err)
                yield (
                    "data: "
                    + json.dumps(
                        {
                            "error": {
                                "message": f"The model stopped answering ({type(err).__name__})",
                                "type": "server_error",
                                "param": None,
                                "code": "model_unavailable",
                            }
                        }
                    )
                    + "\n\n"
                )
            finally:
                if not logged:  # the client went away mid-stream (the task is cancelled): still logged
                    gen.cancel()  # and the replica stops decoding for it
                    record.status, record.error = 499, "client closed the stream"
                    record.latency_ms = (time.perf_counter() - start) * 1000
                    if answer is not None:
                        record.response, record.model_version = answer.text, answer.version
                    self.writer.submit(record)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", responses=_errors(503))
    async def readyz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 - not ready, whatever the reason
            return _error(503, f"No model replica answers ({type(err).__name__})", "server_error")
        if not info.versions:
            return _error(503, "No model version is loaded", "server_error")
        return JSONResponse({"status": "ready", "versions": info.versions, "routing": self.routing.public()})

    @api.get("/v1/models", responses=_errors(401, 429, 503))
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request, "infer", "feedback")
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 - no replica answers: a 503, never a 500
            raise ApiError(503, f"No model replica answers ({type(err).__name__})", "server_error") from None
        default = self.routing.champion or info.default
        data = [
            {
                "id": self.name,
                "object": "model",
                "created": int(info.started_at),
                "owned_by": "tuneloop",
                "version": default,
                "routing": self.routing.public(),
                "prompt": self.routing.prompt.ref if self.routing.prompt else None,  # the chat route's binding
            }
        ]
        data += [
            {
                "id": f"{self.name}:{v}",
                "object": "model",
                "created": int(info.loaded_at.get(v, 0)),
                "owned_by": "tuneloop",
                "version": v,
                "parent": self.name,
            }
            for v in info.versions
        ]
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions", responses=GENERATE_ERRORS)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        messages = [m.model_dump() for m in body.messages]
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        out = await self._complete(
            "/v1/chat/completions", body, request, messages, None, prompt, (body.max_completion_tokens, body.max_tokens)
        )
        if isinstance(out, StreamingResponse):
            return out
        answers, record, checks = out
        return JSONResponse(
            {
                "id": f"chatcmpl-{record.id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.name,
                "system_fingerprint": f"v{answers[0].version}",
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": check.text},
                        "finish_reason": "content_filter" if check.blocked else answer.finish_reason,
                        "logprobs": None if check.changed else _chat_logprobs(answer),
                        **_filtered(check),
                    }
                    for i, (answer, check) in enumerate(zip(answers, checks, strict=True))
                ],
                "usage": _usage(answers),
                **_citations(record),
            }
        )

    @api.post("/v1/completions", responses=GENERATE_ERRORS)
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(
                422, "Send one prompt per request (a list of exactly one string)", "invalid_request_error", "prompt"
            )
        out = await self._complete("/v1/completions", body, request, None, prompts[0], prompts[0], (body.max_tokens,))
        if isinstance(out, StreamingResponse):
            return out
        answers, record, checks = out
        return JSONResponse(
            {
                "id": f"cmpl-{record.id}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.name,
                "system_fingerprint": f"v{answers[0].version}",
                "choices": [
                    {
                        "index": i,
                        "text": check.text,
                        "finish_reason": "content_filter" if check.blocked else answer.finish_reason,
                        "logprobs": None if check.changed else _completion_logprobs(answer),
                        **_filtered(check),
                    }
                    for i, (answer, check) in enumerate(zip(answers, checks, strict=True))
                ],
                "usage": _usage(answers),
            }
        )

    @api.post("/v1/feedback", responses=_errors(400, 401, 403, 404, 413, 422, 429))
    async def post_feedback(self, body: FeedbackRequest, request: Request) -> JSONResponse:
        """Rate an answer: the key that asked for it may, and a key with the `feedback` scope (a
        review tool) may rate any. Someone else's answer looks like a missing one (404)."""
        caller = self._authorize(request, "infer", "feedback")
        rid = body.id.split("-", 1)[1] if body.id.startswith(("chatcmpl-", "cmpl-")) else body.id
        await asyncio.to_thread(self.writer.flush, 5.0)  # the answer may still be on its way to the log
        row = await asyncio.to_thread(self.store.get, rid)
        if row is None or (row.get("key_id") != caller.id and not caller.may("feedback")):
            if row is not None:
                self.refused["foreign_feedback"] += 1
            raise ApiError(
                404,
                f"No logged response of yours has id {body.id!r}",
                "invalid_request_error",
                "id",
                "response_not_found",
            )
        comment = self.writer.clean([body.comment])[0] if body.comment else None
        await asyncio.to_thread(self.store.add_feedback, rid, body.score, comment)
        return JSONResponse({"id": body.id, "object": "feedback", "status": "recorded"})

    @api.get("/v1/usage", responses=_errors(401, 429))
    async def usage(self, request: Request) -> dict[str, Any]:
        """The calling key's own figures: requests and tokens per UTC day (the last 7), its budget."""
        caller = self._authorize(request, "infer", "feedback")
        await asyncio.to_thread(self.writer.flush, 5.0)
        since = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(days=6)
        days = await asyncio.to_thread(self.store.usage, caller.id, since)
        today = days.get(self.budgets.today(), {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
        used = today["prompt_tokens"] + today["completion_tokens"]
        budget = caller.tokens_per_day
        return {
            "object": "usage",
            "key": caller.id,
            "days": [{"date": day, **figures} for day, figures in days.items()],
            "tokens_per_day": budget,
            "tokens_left_today": None if budget is None else max(0, budget - max(used, self.budgets.spent(caller.id))),
        }

    @api.get("/v1/admin/stats", responses=_errors(401, 403, 429))
    async def admin_stats(self, request: Request) -> dict[str, Any]:
        """For operators (`admin` scope): refusals by reason, and the inference-log writer's figures."""
        self._authorize(request, "admin")
        return {
            "refused": dict(self.refused),
            "guardrails": dict(self.guarded),
            "log": self.writer.stats(),
            "routing": self.routing.public(),
        }

    @api.get("/v1/admin/requests/{request_id}", responses=_errors(401, 403, 404, 429))
    async def admin_request(self, request_id: str, request: Request) -> dict[str, Any]:
        """One logged request, as stored (redacted), with its feedback (`admin` scope)."""
        self._authorize(request, "admin")
        rid = request_id.split("-", 1)[1] if request_id.startswith(("chatcmpl-", "cmpl-")) else request_id
        row = await asyncio.to_thread(self.store.get, rid)
        if row is None:
            raise ApiError(404, f"No logged request has id {request_id!r}", "not_found_error", "id", "not_found")
        scores = await asyncio.to_thread(self.store.feedback_for, [rid])
        return {
            **{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()},
            "feedback": scores.get(rid),
        }


def build_app(
    spec: ServeSpec, model_options: dict[str, Any] | None = None, gateway_options: dict[str, Any] | None = None
) -> serve.Application:
    """Bind the application. `spec` is what both deployments are built with."""
    model = ModelServer.options(**(model_options or {})).bind(spec)
    return Gateway.options(**(gateway_options or {})).bind(model, spec)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point of a Serve config file: `args` is `{"spec": {...}}` (what the deploy task
    writes), or `{"config": "configs/local.yaml", "set": [...]}` to build the spec from a
    tuneloop config and the registry's champion."""
    if "spec" in args:
        return build_app(ServeSpec.model_validate(args["spec"]))
    from tuneloop.config import load_config
    from tuneloop.servespec import serve_spec

    cfg = load_config(args.get("config"), list(args.get("set") or []))
    return build_app(serve_spec(cfg, args.get("base_version")))
