"""A training killed with SIGKILL resumes from its last complete checkpoint, skips an
incomplete one, and ends with the loss and weights of a run never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tasks.finetune import COMPLETE_MARKER
from tests.conftest import ASSETS
from tuneloop.config import REPO_ROOT, TrainConfig
from tuneloop.models import resolve_base

# The training process: the same entry as the finetune task, minus MLflow.
WORKER = """
import json, sys
from pathlib import Path
import pandas as pd
from tasks.finetune import build_model, tokenize_examples, train_model
from tuneloop.config import ModelConfig, TrainConfig
from tuneloop.models import BaseRef
cfg, base = TrainConfig.model_validate_json(sys.argv[1]), BaseRef.from_json(json.loads(sys.argv[2]))
loaded = build_model(base, ModelConfig(), cfg)
examples = tokenize_examples(loaded[1], pd.read_json(sys.argv[3], lines=True), cfg.max_seq_len)
outcome = train_model(examples, base, ModelConfig(), cfg, Path(sys.argv[4]), loaded=loaded)
print("RESULT " + json.dumps({"loss": outcome.final_loss, "steps": outcome.steps,
                              "resumed_from": outcome.resumed_from and outcome.resumed_from.name}))
"""
# 40 steps of 4 examples: 4 epochs of tiny_qa, so the resumed run must restore the epoch's order.
CFG = TrainConfig(max_steps=40, batch_size=4, max_seq_len=48, save_steps=5, lora_dropout=0.1)


def _command(base, out_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-c",
        WORKER,
        CFG.model_dump_json(),
        json.dumps(base.to_json()),
        str(ASSETS / "tiny_qa.jsonl"),
        str(out_dir),
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _run(base, out_dir: Path) -> dict:
    done = subprocess.run(_command(base, out_dir), env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def _adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "artifact" / "adapter" / "adapter_model.safetensors")


def test_killed_training_resumes_to_the_same_loss_and_weights(models_dir: Path, tmp_path: Path) -> None:
    base = resolve_base("builtin:tiny-llama", models_dir)
    reference = _run(base, tmp_path / "reference")

    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(base, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list((out / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "artifact").exists(), "the training ended before it was killed: the test proves nothing"
    complete = max(
        (p.parent for p in (out / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}")),
        key=lambda p: int(p.name.split("-")[1]),
    )
    # A later save cut off mid-write: its files are there, truncated, and it has no marker.
    torn = out / "checkpoints" / "checkpoint-35"
    shutil.rmtree(torn, ignore_errors=True)
    shutil.copytree(complete, torn)
    (torn / COMPLETE_MARKER).unlink()
    optimizer = torn / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])

    resumed = _run(base, out)
    assert resumed["resumed_from"] == complete.name and resumed["steps"] == 40
    assert (torn / COMPLETE_MARKER).exists()  # removed, then written again whole at step 35
    assert abs(resumed["loss"] - reference["loss"]) <= 1e-5
    before, after = _adapter(tmp_path / "reference"), _adapter(out)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_a_checkpoint_without_marker_is_never_resumed(tmp_path: Path) -> None:
    from tasks.finetune import last_complete_checkpoint

    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert not (tmp_path / "checkpoint-15").exists()
    assert last_complete_checkpoint(tmp_path / "absent") is None
