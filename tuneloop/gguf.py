"""Derived versions for llama.cpp: a registered version merged, converted to GGUF and quantized,
and the llama.cpp sequences that evaluation and serving decode it with.

    info = derive(parent_dir, "models:/m/3", "q8_0", out_dir, work_dir)  # out_dir/gguf/model.gguf, tokenizer, base ref
    seqs = Sequences(out_dir / "gguf" / "model.gguf", n_seq=16, n_ctx_seq=512, threads=2)
    logits = seqs.decode({0: (prompt_ids, 0)})                    # {seq: last logits}; a row per sequence
    seqs.forget(0)                                                # its KV cells are free again

Every step is llama.cpp's own: `convert_hf_to_gguf.py` (from the llama.cpp sources that
llama-cpp-python is built from; `make install` keeps it under `.venv/share/llama.cpp`) writes
the merged float32 model as GGUF, `llama_model_quantize` quantizes it, and llama.cpp's batch API
decodes several sequences in one `llama_decode` (one KV cache, a sequence id per request).
What is ours: merging the adapter first (PEFT's `merge_and_unload`), the lineage, and the
continuous batching around `llama_decode` (serving/llamacpp.py), which llama-cpp-python's
`Llama` class does not do (it decodes one sequence).

Token ids are the HF tokenizer's (the converter copies its vocabulary in id order): the replica
renders and detokenizes with the artifact's `tokenizer/` as for every other version.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GGUF_DIR = "gguf"
GGUF_FILE = "model.gguf"
DERIVATION_FILE = "derivation.json"
CONVERTER_ENV = "TUNELOOP_LLAMA_CPP_DIR"  # a llama.cpp source tree holding convert_hf_to_gguf.py


@dataclass(frozen=True)
class Method:
    """A derivation: llama.cpp's quantization type (its `llama_ftype`) and its nominal bits per weight."""

    name: str
    ftype: int
    bits: int


# Names as llama.cpp's `llama-quantize` tool spells them. Q4_K_M needs rows that are multiples of
# 256; llama.cpp quantizes narrower tensors (a tiny test model's) with a fallback type and says so.
METHODS = {
    "q8_0": Method("q8_0", 7, 8),
    "q4_k_m": Method("q4_k_m", 15, 4),
    "q4_0": Method("q4_0", 2, 4),
    "f16": Method("f16", 1, 16),
}


class DerivationError(RuntimeError):
    """A version that cannot be derived (or a machine without the tools to derive it)."""


@dataclass(frozen=True)
class Derivation:
    """What a derived artifact is, written next to it as derivation.json and as the version's tags."""

    derived_from: str  # the parent's model URI (models:/name/version)
    parent_sha256: str  # the parent artifact's digest
    method: str
    bits: int
    size_bytes: int  # of the GGUF file
    parent_size_bytes: int  # of the parent's weights as served (base + adapter, float32)
    engine: str = "llama.cpp"
    llama_cpp_python: str = ""

    def tags(self) -> dict[str, str]:
        return {
            "tuneloop.derived_from": self.derived_from,
            "tuneloop.derivation.method": self.method,
            "tuneloop.derivation.bits": str(self.bits),
            "tuneloop.derivation.size_bytes": str(self.size_bytes),
            "tuneloop.derivation.parent_size_bytes": str(self.parent_size_bytes),
            "tuneloop.derivation.parent_sha256": self.parent_sha256,
            "tuneloop.engine": f"{self.engine} (llama-cpp-python {self.llama_cpp_python})",
        }


def method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise DerivationError(f"Unknown derivation method {name!r}: one of {', '.join(METHODS)}") from None


def available() -> str | None:
    """Why llama.cpp cannot be used here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        return f"llama-cpp-python is not installed ({err}): run `make install`"
    return None


def converter_dir() -> Path:
    """The llama.cpp source tree whose convert_hf_to_gguf.py (and conversion/, gguf-py/) turn a
    transformers checkpoint into GGUF: $TUNELOOP_LLAMA_CPP_DIR, else the one `make install` keeps."""
    where = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "share" / "llama.cpp")
    if not (where / "convert_hf_to_gguf.py").is_file():
        raise DerivationError(
            f"{where} holds no convert_hf_to_gguf.py: run `make install` (it keeps llama.cpp's converter from "
            f"the llama-cpp-python sources) or set {CONVERTER_ENV} to a llama.cpp checkout"
        )
    return where


def derive(parent_dir: Path, parent_uri: str, how: str, out_dir: Path, work_dir: Path) -> Derivation:
    """Merge the parent (adapter on its base, or full weights) in float32, convert it to GGUF with
    llama.cpp's converter, quantize it with `how`; write the derived artifact into `out_dir`
    (gguf/model.gguf, tokenizer/, the parent's base reference, derivation.json)."""
    from tuneloop.models import (
        BaseModelError,
        artifact_kind,
        artifact_sha256,
        load_adapter_model,
        read_base_ref,
        write_artifact_metadata,
    )

    m = method(how)
    if (why := available()) is not None:
        raise DerivationError(why)
    if artifact_kind(parent_dir) == "gguf":
        raise DerivationError(f"{parent_uri} is already a derived GGUF version: derive from its float parent")
    converter = converter_dir()
    import llama_cpp

    merged = work_dir / "merged"
    shutil.rmtree(work_dir, ignore_errors=True)
    merged.mkdir(parents=True)
    try:
        model, tok = load_adapter_model(parent_dir, "float32")
    except BaseModelError as err:
        raise DerivationError(f"{parent_uri} cannot be loaded to derive from: {err}") from err
    if hasattr(model, "merge_and_unload"):  # a PEFT adapter: its LoRA deltas go into the weights
        model = model.merge_and_unload()
    model.save_pretrained(merged)
    tok.save_pretrained(merged)
    del model
    f32 = work_dir / "model-f32.gguf"
    convert(merged, f32, converter)
    target = out_dir / GGUF_DIR / GGUF_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    quantize(f32, target, m)
    f32.unlink(missing_ok=True)
    shutil.rmtree(merged, ignore_errors=True)
    write_artifact_metadata(tok, read_base_ref(parent_dir), out_dir)
    info = Derivation(
        derived_from=parent_uri,
        parent_sha256=artifact_sha256(parent_dir),
        method=m.name,
        bits=m.bits,
        size_bytes=target.stat().st_size,
        parent_size_bytes=_served_size(parent_dir),
        llama_cpp_python=llama_cpp.__version__,
    )
    (out_dir / DERIVATION_FILE).write_text(json.dumps(asdict(info), indent=2))
    return info


def _served_size(artifact_dir: Path) -> int:
    """Bytes of the parent's weights as a float32 replica holds them (base parameters × 4, plus
    the adapter's files)."""
    from tuneloop.models import artifact_kind, read_base_ref

    def params(folder: Path) -> int:
        from safetensors import safe_open

        n = 0
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():  # noqa: SIM118 - safe_open is not a dict
                    size = 1
                    for d in st.get_slice(k).get_shape():
                        size *= d
                    n += size
        return n

    if artifact_kind(artifact_dir) == "full":
        return params(artifact_dir / "model") * 4
    adapter = sum(p.stat().st_size for p in (artifact_dir / "adapter").rglob("*") if p.is_file())
    return params(Path(read_base_ref(artifact_dir).location)) * 4 + adapter


def convert(hf_dir: Path, out: Path, converter: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py on a transformers checkpoint, float32 out, in a child process."""
    cmd = [sys.executable, "-m", "tuneloop.gguf", "convert", str(hf_dir), str(out), str(converter)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise DerivationError(f"convert_hf_to_gguf.py failed on {hf_dir} (exit {done.returncode}):\n{tail}")


def _run_converter(hf_dir: str, out: str, converter: str) -> None:
    """The converter's own main(), after one change: a byte-level BPE tokenizer that llama.cpp's
    table of known pre-tokenizers does not list (one trained locally, as the tiny test model's)
    is declared "gpt-2", the regex every byte-level BPE pre-tokenizer of tokenizers applies. Any
    other unknown tokenizer still fails, as the converter wants."""
    sys.path.insert(0, converter)
    sys.path.insert(1, str(Path(converter) / "gguf-py"))
    from conversion.base import TextModel  # type: ignore[import-not-found]

    known = TextModel.get_vocab_base_pre

    def known_or_byte_level(self: Any, tokenizer: Any) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            spec = json.loads((Path(hf_dir) / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
            if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
                return "gpt-2"
            raise

    TextModel.get_vocab_base_pre = known_or_byte_level
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", "f32"]
    import convert_hf_to_gguf  # type: ignore[import-not-found]

    convert_hf_to_gguf.main()


def quantize(src: Path, dst: Path, how: Method) -> None:
    import llama_cpp

    _init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = how.ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise DerivationError(f"llama_model_quantize({src.name} → {how.name}) failed: {rc}")


def read_derivation(artifact_dir: Path) -> dict[str, Any] | None:
    path = Path(artifact_dir) / DERIVATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------- decoding


_backend = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready, _quiet
    import llama_cpp

    with _backend:
        if not _backend_ready:
            _quiet = _make_quiet()
            llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


_quiet: Any = None


def _make_quiet() -> Any:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def sink(level: int, text: bytes, user_data: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR; its info and warnings (context sizes, fallbacks) stay quiet
            log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())
        elif level == 3:
            log.debug("llama.cpp: %s", text.decode(errors="replace").rstrip())

    return sink


MIN_PREFIX = 4  # a shorter shared prefix is not worth its own sequence


class Sequences:
    """A GGUF model and one llama.cpp context holding up to `n_seq` sequences of `n_ctx_seq` tokens each.

    `decode` runs one `llama_decode` over new tokens of several sequences (a prompt, or one token
    per running sequence) and returns each sequence's last logits; `forget` frees a sequence's KV
    cells. `start` begins a sequence on the shared prefix: the tokens every prompt starts with (a
    chat template's system prompt) are decoded once into a sequence of their own and their KV
    cells shared with each new sequence (`llama_memory_seq_cp` in one unified cache: no copy),
    so a prompt decodes only its own tokens. Not thread-safe: one decoding thread owns it.
    """

    def __init__(self, path: Path, n_seq: int, n_ctx_seq: int, threads: int) -> None:
        import llama_cpp
        import numpy as np

        _init_backend()
        self.np = np
        self.ll = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise DerivationError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_seq = n_seq
        self.n_ctx_seq = min(n_ctx_seq, llama_cpp.llama_model_n_ctx_train(self.model))
        cparams = llama_cpp.llama_context_default_params()
        self.prefix_seq = n_seq  # the extra sequence holding the shared prefix
        self.prefix: list[int] = []
        cparams.n_ctx = self.n_ctx_seq * (n_seq + 1)
        cparams.n_batch = max(512, self.n_ctx_seq + n_seq)
        cparams.n_ubatch = min(cparams.n_batch, 512)
        cparams.n_seq_max = n_seq + 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # One cache for all sequences, so that they share the prefix's cells; flash attention on.
        # Measured with 32 sequences of NQ-open chats (BENCHMARKS.md): unified + flash attention
        # 162-177 tok/s, a stream per sequence 150-160, without flash attention 95-146.
        cparams.kv_unified = True
        cparams.flash_attn_type = 1
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise DerivationError(f"llama.cpp could not make a context for {path} ({n_seq} × {n_ctx_seq} tokens)")
        self.n_batch = cparams.n_batch
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.threads = threads

    def close(self) -> None:
        ll = self.ll
        if self.ctx:
            ll.llama_batch_free(self.batch)
            ll.llama_free(self.ctx)
            ll.llama_model_free(self.model)
            self.ctx = self.model = None

    def __del__(self) -> None:  # frees llama.cpp's memory (the KV cache) with the object
        with contextlib.suppress(Exception):  # at interpreter exit llama_cpp may be gone first
            self.close()

    def forget(self, seq: int) -> None:
        self.ll.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def share(self, prompts: list[list[int]]) -> None:
        """Keep as the shared prefix what `prompts` (≥ 2, or one and the current prefix) all begin
        with, when it is at least MIN_PREFIX tokens and not the prefix already."""
        if len(prompts) < 2 and not self.prefix:
            return
        common = list(os.path.commonprefix([*prompts, *([self.prefix] if len(prompts) < 2 else [])]))
        if len(common) < MIN_PREFIX or (len(self.prefix) >= len(common) and common == self.prefix[: len(common)]):
            return
        self.forget(self.prefix_seq)  # cells other sequences still share stay theirs
        self.prefix = []
        self.decode({self.prefix_seq: (common, 0)}, outputs=False)
        self.prefix = common

    def start(self, seq: int, prompt: list[int]) -> tuple[list[int], int]:
        """Begin `seq` on the shared prefix; return the prompt's tokens still to decode and their position."""
        n = min(len(os.path.commonprefix([self.prefix, prompt])) if self.prefix else 0, len(prompt) - 1)
        if n < MIN_PREFIX:
            return list(prompt), 0
        self.ll.llama_memory_seq_cp(self.memory, self.prefix_seq, seq, 0, n)
        return list(prompt[n:]), n

    def decode(
        self, work: dict[int, tuple[list[int], int]], all_logits: bool = False, outputs: bool = True
    ) -> dict[int, Any]:
        """`work`: sequence → (new tokens, position of the first). Return sequence → logits of its
        last token [vocab] (with `all_logits`, of each new token [n, vocab]). Long work is cut into
        several `llama_decode` calls of at most n_batch tokens."""
        np = self.np
        entries = [
            (seq, tok, pos + i, outputs and i == len(toks) - 1)
            for seq, (toks, pos) in work.items()
            for i, tok in enumerate(toks)
        ]
        out: dict[int, Any] = {}
        rows: dict[int, list[Any]] = {}
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            b = self.batch
            for i, (seq, tok, pos, last) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = (all_logits and outputs) or last
            b.n_tokens = len(chunk)
            rc = self.ll.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(
                    f"llama_decode failed ({rc}{': no KV cache room' if rc == 1 else ''}) on {len(chunk)} tokens"
                )
            for i, (seq, _tok, _pos, last) in enumerate(chunk):
                if (all_logits and outputs) or last:
                    ptr = self.ll.llama_get_logits_ith(self.ctx, i)
                    row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
                    rows.setdefault(seq, []).append(row)
        for seq, got in rows.items():
            out[seq] = np.stack(got) if all_logits else got[-1]
        return out


class GgufModel:
    """A derived version as evaluation uses a model: greedy answers to token-id prompts, decoded
    together as llama.cpp sequences, and the log-likelihood of reference answers (perplexity)."""

    is_gguf = True  # tuneloop.generation and tasks.evaluate.perplexity decode through it

    def eval(self) -> GgufModel:  # as a torch module's: nothing to switch, inference only
        return self

    def __init__(
        self, artifact_dir: Path, eos_id: int, n_seq: int = 8, n_ctx_seq: int = 1024, threads: int = 0
    ) -> None:
        self.path = Path(artifact_dir) / GGUF_DIR / GGUF_FILE
        self.eos_id = eos_id
        self.seqs = Sequences(self.path, n_seq, n_ctx_seq, threads or torch_threads())

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], bool]]:
        """Greedy continuations (tokens before EOS, stopped at EOS?) of every prompt."""
        results: list[tuple[list[int], bool]] = []
        n = self.seqs.n_seq
        for i in range(0, len(prompts), n):
            results += self._greedy(prompts[i : i + n], max_new_tokens)
        return results

    def _greedy(self, prompts: list[list[int]], budget: int) -> list[tuple[list[int], bool]]:
        seqs = self.seqs
        tokens: dict[int, list[int]] = {s: [] for s in range(len(prompts))}
        stopped: dict[int, bool] = {}
        room = {s: max(0, min(budget, seqs.n_ctx_seq - len(p))) for s, p in enumerate(prompts)}
        seqs.share(prompts)
        work = {s: seqs.start(s, p) for s, p in enumerate(prompts) if room[s] > 0}
        stopped.update({s: False for s in range(len(prompts)) if room[s] == 0})
        try:
            while work:
                logits = seqs.decode(work)
                nxt: dict[int, tuple[list[int], int]] = {}
                for s, row in logits.items():
                    tok = int(row.argmax())
                    if tok == self.eos_id:
                        stopped[s] = True
                        continue
                    tokens[s].append(tok)
                    if len(tokens[s]) >= room[s]:
                        stopped[s] = False
                        continue
                    nxt[s] = ([tok], len(prompts[s]) + len(tokens[s]) - 1)
                work = nxt
        finally:
            for s in range(len(prompts)):
                seqs.forget(s)
        return [(tokens[s], stopped.get(s, False)) for s in range(len(prompts))]

    def answer_logprobs(self, ids: list[int], labels: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood of the labelled tokens (labels != -100, next-token) and their count."""
        np = self.seqs.np
        ids = ids[: self.seqs.n_ctx_seq]
        try:
            logits = self.seqs.decode({0: (ids, 0)}, all_logits=True)[0]
        finally:
            self.seqs.forget(0)
        total, count = 0.0, 0
        for t in range(len(ids) - 1):
            label = labels[t + 1]
            if label == -100:
                continue
            row = logits[t].astype(np.float64)
            top = row.max()
            total += float(np.log(np.exp(row - top).sum()) + top - row[label])
            count += 1
        return total, count


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":  # python -m tuneloop.gguf convert HF_DIR OUT CONVERTER_DIR
    if len(sys.argv) != 5 or sys.argv[1] != "convert":
        sys.exit("usage: python -m tuneloop.gguf convert HF_DIR OUT.gguf LLAMA_CPP_DIR")
    _run_converter(sys.argv[2], sys.argv[3], sys.argv[4])
