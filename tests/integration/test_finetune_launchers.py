"""The training entry point under a multi-process launcher: torchrun with 2 CPU ranks (gloo DDP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ASSETS, make_config
from tuneloop.config import REPO_ROOT
from tuneloop.models import load_adapter_model

pytestmark = pytest.mark.slow


def test_torchrun_two_cpu_ranks_train_one_adapter(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "home", models_dir)  # links the session's built models
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "-m",
        "tasks.finetune",
        "--data",
        str(ASSETS / "tiny_qa.jsonl"),
        "--out",
        str(out),
        "--set",
        f"home={cfg.home}",
        "--set",
        "model.base=builtin:tiny-llama",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.max_seq_len=48",
        "--set",
        "train.save_steps=2",
        "--set",
        "train.torch_threads=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (
        "(3 steps on 2 ranks" in done.stderr and (out / "checkpoints" / "checkpoint-2" / "tuneloop-complete").exists()
    )
    model, _ = load_adapter_model(out / "artifact")
    assert model.peft_config["default"].r == 8
