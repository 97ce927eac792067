"""Fine-tuning across machines with Ray Train: the same trainer on every worker, DDP between them.

    trained = finetune_ray(split.train, base, cfg.model, cfg.train, workdir, run_id,
                           num_workers=4, use_gpu=True)     # inside a flow, Ray already connected

Ray Train's `TorchTrainer` starts `num_workers` processes (one per GPU, or CPU workers), sets
up torch.distributed between them, and each runs `train_model`: the HF Trainer sees the
process group and trains data-parallel. `out_dir` must be storage every worker reaches (a
shared volume on a cluster): checkpoints, their completion markers and the artifact go there,
so a worker group restarted after a failure (`max_failures`) resumes from the last complete
checkpoint like a single process does. Rank 0 writes figures to MLflow and the artifact.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from tasks.finetune import TrainedAdapter, _no_retry_for_bad_input
from tuneloop.config import ModelConfig, TrainConfig
from tuneloop.models import BaseRef


def _worker(config: dict[str, Any]) -> None:
    """Train on one Ray worker; report the figures of the run back to the driver."""
    import ray.train
    import torch.distributed as dist

    from tasks.finetune import train_on

    cfg = TrainConfig.model_validate(config["train"])
    model_cfg = ModelConfig.model_validate(config["model"])
    base = BaseRef.from_json(config["base"])
    outcome = train_on(config["frame"], base, model_cfg, cfg, Path(config["out_dir"]), config["run_id"])
    figures = {
        "steps": outcome.steps,
        "final_loss": outcome.final_loss,
        "train_tokens": outcome.train_tokens,
        "tokens_per_second": outcome.tokens_per_second,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }
    # Ray Train 2 keeps, as the result's metrics, only what is reported with a checkpoint:
    # rank 0 attaches one holding the figures (the adapter itself is in out_dir).
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "figures.json").write_text(json.dumps(figures))
            ray.train.report(figures, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(figures)


@task(name="finetune-ray", retries=1, retry_delay_seconds=10, retry_condition_fn=_no_retry_for_bad_input)
def finetune_ray(
    train: pd.DataFrame,
    base: BaseRef,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    run_id: str | None,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    max_failures: int = 2,
) -> TrainedAdapter:
    """Fine-tune on `num_workers` Ray Train workers of the connected Ray cluster; return the adapter."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir = Path(out_dir).resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "model": model_cfg.model_dump(mode="json"),
            "base": base.to_json(),
            "frame": train,
            "out_dir": str(out_dir),
            "run_id": run_id,
        },
        # Per worker: one GPU, or `cpus_per_worker` cores (torch uses that many threads).
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=f"finetune-{run_id or 'local'}",
            storage_path=str(out_dir / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    m = result.metrics
    return TrainedAdapter(
        out_dir / "artifact",
        base,
        int(m["steps"]),
        float(m["final_loss"]),
        int(m["train_tokens"]),
        float(m["tokens_per_second"]),
    )


def arguments():
    """The launcher's argument parser: the training launcher's, plus the Ray Train workers."""
    from tasks.finetune import launcher_parser

    parser = launcher_parser(main.__doc__, "checkpoints and artifact, on shared storage")
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (one per GPU with --use-gpu)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (torch threads)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Fine-tune on the Ray cluster this runs on: the entry point of a RayJob (infra/kuberay/rayjob-finetune.yaml).

        python -m tasks.finetune_ray --data /data/tuneloop/data/train.jsonl --out /data/tuneloop/runs/a \\
            --num-workers 4 --use-gpu --set train.method=full --set train.deepspeed=zero3

    Training only, like `python -m tasks.finetune`, on `--num-workers` Ray Train workers (DDP, or
    DeepSpeed ZeRO with train.deepspeed); Ray Train connects to the cluster of the Ray job
    (RAY_ADDRESS). `--out` and the state dir must be storage every worker reaches; run it again
    with the same `--out` to resume from the last complete checkpoint.
    """
    import logging

    from tasks.finetune import launcher_inputs

    args, cfg, rows, base = launcher_inputs(arguments(), argv)
    trained = finetune_ray.fn(
        rows,
        base,
        cfg.model,
        cfg.train,
        args.out,
        None,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
    )
    logging.getLogger(__name__).info(
        "Artifact: %s (%d steps on %d workers, final loss %.4f)",
        trained.artifact_dir,
        trained.steps,
        args.num_workers,
        trained.final_loss,
    )


if __name__ == "__main__":
    main()
