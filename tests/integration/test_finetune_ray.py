"""Ray Train: two CPU workers train one adapter data-parallel on a Ray instance of the test's own
(started with `ray.init(address="local")` on 127.0.0.1 and shut down by it; never `ray stop`)."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tasks.finetune import COMPLETE_MARKER
from tests.conftest import ASSETS
from tuneloop.config import REPO_ROOT, ModelConfig, TrainConfig
from tuneloop.models import load_adapter_model, resolve_base

pytestmark = pytest.mark.slow


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_two_cpu_workers_train_one_adapter(local_ray, models_dir: Path, tmp_path: Path) -> None:
    from tasks.finetune_ray import finetune_ray

    base = resolve_base("builtin:tiny-llama", models_dir)
    frame = pd.read_json(ASSETS / "tiny_qa.jsonl", lines=True)
    cfg = TrainConfig(max_steps=4, batch_size=4, max_seq_len=48, save_steps=2, torch_threads=1)
    out = tmp_path / "run"
    trained = finetune_ray.fn(frame, base, ModelConfig(), cfg, out, None, num_workers=2, cpus_per_worker=1)
    assert trained.steps == 4 and math.isfinite(trained.final_loss)
    assert (out / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER).exists()
    model, tok = load_adapter_model(trained.artifact_dir)
    assert model.peft_config["default"].r == cfg.lora_rank and tok.chat_template


def test_two_cpu_workers_form_one_process_group(local_ray, models_dir: Path, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.finetune_ray import _worker

    base = resolve_base("builtin:tiny-llama", models_dir)
    cfg = TrainConfig(max_steps=2, batch_size=4, max_seq_len=48, save_steps=None, torch_threads=1)
    result = TorchTrainer(
        _worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "model": ModelConfig().model_dump(mode="json"),
            "base": base.to_json(),
            "frame": pd.read_json(ASSETS / "tiny_qa.jsonl", lines=True),
            "out_dir": str(tmp_path / "run"),
            "run_id": None,
        },
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()
    assert result.metrics["world_size"] == 2 and result.metrics["steps"] == 2
