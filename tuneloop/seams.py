"""What crosses a seam between layers, typed once: every layer reads these, none restates them.

    spec = ServeSpec(...)                        # what a Serve deployment of tuneloop is built with
    Routing(champion="3", challenger="4", mode="canary", share=0.1)    # the gateway's table
    ServedVersions(adapters={"3": "models:/m/3"}, default="3")        # the replicas' versions
    GenerationRequest / Answer / Refusal / StreamEvent                  # gateway ↔ engine
    ReplicaInfo                                  # what a model replica reports (deploy task, /v1/models)
    CanaryVerdict                                # what the promotion flow decides on
    RetrainRequest                               # what monitoring hands the training deployment

Values that come from the config (limits, batch sizes, …) have no defaults here: they are
read from `tuneloop.config` once, when a spec is built (`tuneloop.servespec`), so a default
lives in one place. The models are pydantic (validated where they arrive: a Serve config's
args, a `user_config`, a flow parameter) or frozen dataclasses (inside one process or
pickled by Ray between replicas).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tuneloop.config import SLICE_PATTERN, ApiKeyConfig, DataConfig, GuardrailsConfig, TuneloopConfig
from tuneloop.gate import RuleResult
from tuneloop.prompts import PromptSpec


class _Seam(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- serving spec


class EngineSpec(_Seam):
    """How a model replica decodes (from `serve.*`)."""

    torch_threads: int = Field(ge=1)
    max_batch_size: int = Field(ge=1)
    batch_wait_timeout_s: float = Field(ge=0)
    merge_default: bool
    prefix_cache: int = Field(ge=0)
    max_prompt_tokens: int = Field(ge=1)
    max_new_tokens: int = Field(256, ge=1)  # serve.max_tokens_limit: with the prompt, a request's context
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"

    def resolved_dtype(self, cuda: bool, bf16: bool) -> str:
        """The dtype a replica loads with: `auto` is bfloat16 on a GPU that has it, float16 on one
        that does not, float32 on CPU."""
        if self.dtype != "auto":
            return self.dtype
        return ("bfloat16" if bf16 else "float16") if cuda else "float32"


class GatewaySpec(_Seam):
    """How the HTTP gateway admits, limits and logs requests (from `serve.*`)."""

    default_max_tokens: int = Field(ge=1)
    max_tokens_limit: int = Field(ge=1)
    max_n: int = Field(4, ge=1)  # choices per request
    max_request_bytes: int = Field(ge=1)
    require_api_key: bool
    api_keys: list[ApiKeyConfig]
    api_keys_file: str | None = None  # re-read by the gateway when it changes
    rate_per_minute: int = Field(ge=1)
    burst: int = Field(ge=1)
    log_pii: Literal["redact", "keep"]
    pii_entities: list[str]
    guardrails: GuardrailsConfig = GuardrailsConfig()  # what each route lets through of the model's answers
    collections_root: str | None = None  # where bound collections live: a folder, or a postgresql:// URI


class ServeSpec(_Seam):
    """The static arguments of tuneloop's Serve application (JSON in a Serve config's `args.spec`)."""

    model_name: str
    base_uri: str  # models:/<name>/<version>: the version whose base (or full weights) the replicas load
    champion_alias: str
    tracking_uri: str
    inference_db_url: str
    engine: EngineSpec
    gateway: GatewaySpec

    @property
    def base_version(self) -> str:
        return self.base_uri.rstrip("/").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------- what changes at run time


RoutingMode = Literal["off", "canary", "shadow"]


class Routing(_Seam):
    """The gateway's routing table (its Serve `user_config`).

    Routed requests (model = the served name) go to `champion`; in `canary` mode a `share` of
    them to `challenger`; in `shadow` mode the challenger also answers a copy of each, logged
    and never returned.
    """

    champion: str | None = None
    challenger: str | None = None
    mode: RoutingMode = "off"
    share: float = Field(0.0, ge=0, le=1)
    # The chat route's prompt version (rendered by the gateway: changing it reloads no model), and a
    # challenger prompt for a prompt-only canary or shadow (the challenger arm: the champion's
    # model version, or `challenger`, with this prompt).
    prompt: PromptSpec | None = None
    challenger_prompt: PromptSpec | None = None

    @field_validator("champion", "challenger", mode="before")
    @classmethod
    def _version_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _challenger_for_a_mode(self) -> Routing:
        if self.mode != "off" and not self.challenger and self.challenger_prompt is None:
            raise ValueError(f"routing mode {self.mode} needs a challenger version or prompt")
        return self

    def public(self) -> dict[str, object]:
        """The table as the gateway shows it (/readyz, /v1/models): prompt versions by reference,
        never their templates."""
        return {
            **self.model_dump(exclude={"prompt", "challenger_prompt"}),
            "prompt": self.prompt.ref if self.prompt else None,
            "challenger_prompt": self.challenger_prompt.ref if self.challenger_prompt else None,
        }

    @classmethod
    def only(cls, champion: str | None) -> Routing:
        """Everything to `champion` (None: the replicas' default)."""
        return cls(champion=champion)


class ServedVersions(_Seam):
    """The model replicas' versions (their Serve `user_config`): version → model URI, and the default."""

    adapters: dict[str, str] = Field(default_factory=dict)
    default: str | None = None

    @field_validator("adapters", mode="before")
    @classmethod
    def _keys_text(cls, value: object) -> object:
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("default", mode="before")
    @classmethod
    def _default_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value


# --------------------------------------------------------------------------- gateway ↔ engine


Arm = Literal["champion", "challenger", "shadow", "pinned"]
FinishReason = Literal["stop", "length", "content_filter"]  # content_filter: the gateway's guardrails refused it


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are chosen, and what it wants back besides them.

    temperature 0 is greedy (the default); otherwise the logits are divided by it, cut to the
    `top_k` most likely tokens (0: no cut) and to the smallest set holding `top_p` of the
    probability, and a token is drawn with the request's own generator (seeded by `seed`: the
    same seed, prompt and version give the same tokens). `stop`: strings that end the answer
    (not returned). `logprobs`: each chosen token's log-probability under the model, with the
    `top_logprobs` most likely alternatives. `json_schema`: only tokens that keep the answer a
    prefix of JSON valid under the schema are allowed (an answer that cannot finish within its
    budget ends with finish reason `length`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: str | None = None  # constrained decoding: the answer is JSON valid under this schema

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-3  # colder than this is greedy in float32 anyway (and 1/t overflows)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # the most likely tokens at that step, best first


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it: chat messages or a raw completion prompt, and its budget."""

    version: str | None  # a loaded version, or None: the replica's default
    max_tokens: int
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) turns, for chat
    text: str | None = None  # a raw completion prompt
    request_id: str = ""
    pinned: bool = False  # asked for this version by name: never answered by another
    sampling: Sampling = Sampling()

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError("a generation request holds either messages or a text prompt")

    @property
    def chat(self) -> list[dict[str, str]] | None:
        return [{"role": r, "content": c} for r, c in self.messages] if self.messages is not None else None


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    version: str
    replica: str = ""
    logprobs: tuple[TokenLogprob, ...] | None = None  # with Sampling.logprobs


RefusalCode = Literal["prompt_too_long", "prompt_empty", "version_not_loaded", "bad_response_format"]


@dataclass(frozen=True)
class Refusal:
    """A request the engine will not answer, for a reason of the request's own (the gateway's 4xx)."""

    code: RefusalCode
    message: str


@dataclass(frozen=True)
class StreamEvent:
    """One event of a streamed answer: `start` (accepted), `delta` (new text), `done` (the
    answer, with the last `text` not yet sent) or `refused` (before any text)."""

    kind: Literal["start", "delta", "done", "refused"]
    text: str = ""
    answer: Answer | None = None
    refusal: Refusal | None = None


@dataclass(frozen=True)
class DecodingStats:
    batches: int = 0
    rows: int = 0
    tokens: int = 0
    steps: int = 0
    row_steps: int = 0  # rows decoded per step = row_steps / steps
    prefills: int = 0
    abandoned: int = 0  # rows whose client went away before they were done
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefix_hits: int = 0
    prefix_misses: int = 0


@dataclass(frozen=True)
class ReplicaInfo:
    """What a model replica serves and how it is doing."""

    replica: str
    actor_name: str
    pid: int
    base: str
    base_sha256: str
    versions: list[str]  # loaded versions (an adapter each, or the full-weights version)
    default: str | None
    started_at: float
    loaded_at: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # version → why it could not be loaded
    merged: list[str] = field(default_factory=list)
    engine: str = ""
    decoding: DecodingStats = field(default_factory=DecodingStats)
    dtype: str = ""  # what the weights were loaded as
    attention: str = ""  # the attention implementation transformers chose or was given


# --------------------------------------------------------------------------- promotion


@dataclass(frozen=True)
class CanaryVerdict:
    """How the challenger did against the champion over a canary (or shadow) window."""

    decision: Literal["promote", "rollback"]
    basis: Literal["rules", "no_traffic"]  # the rules decided, or too little traffic to compare
    rules: list[RuleResult]  # each rule's outcome (skipped: a figure missing on either side)
    figures: dict[str, dict[str, float]]  # arm → metric → value
    note: str = ""  # with basis no_traffic: what was seen and what was done

    @property
    def failed(self) -> list[RuleResult]:
        return [r for r in self.rules if r.outcome == "fail"]

    def reason(self) -> str:
        if self.basis == "no_traffic":
            return self.note
        if self.failed:
            return "; ".join(r.line() for r in self.failed)
        return f"{sum(r.outcome == 'pass' for r in self.rules)} of {len(self.rules)} canary rules held"


# --------------------------------------------------------------------------- retraining


RetrainSource = Literal["feedback", "teacher", "labelled"]


class RetrainingData(_Seam):
    """The data a retraining run trains on, and where it came from (recorded in lineage).

    Files are JSONL of `{"messages": [...]}` conversations (tasks.data reads them as chat data).
    """

    path: str  # the new rows: split into training rows and the new held-out slice
    slice: str = Field(pattern=SLICE_PATTERN)  # the new slice's name
    sources: dict[RetrainSource, int]  # rows per source
    replay_path: str | None  # earlier training rows, training only
    replay_rows: int = Field(ge=0)
    note: str  # human-readable: what it is, for the run's trigger and tags

    @property
    def rows(self) -> int:
        return sum(self.sources.values())


class RetrainRequest(_Seam):
    """What the monitoring flow asks the training deployment to do for a drift episode."""

    episode: str
    reason: str  # the drift verdict, for people
    monitoring_run: str
    data: RetrainingData

    def training_config(self, cfg: TuneloopConfig) -> TuneloopConfig:
        """Return `cfg` training on this request's data from `monitor.retrain_start_from`, the rest unchanged."""
        data: DataConfig = cfg.data.model_copy(
            update={
                "path": self.data.path,
                "format": "jsonl",
                "messages_field": "messages",
                "eval_path": None,
                "replay_path": self.data.replay_path,
                "slice": self.data.slice,
                "max_rows": None,
            }
        )
        train = cfg.train.model_copy(update={"start_from": cfg.monitor.retrain_start_from})
        return cfg.model_copy(update={"data": data, "train": train})

    def trigger(self) -> str:
        return (
            f"drift episode {self.episode} ({self.reason[:300]}; monitoring run {self.monitoring_run}; "
            f"data: {self.data.note})"
        )
