"""The training flow end to end on the tiny model: real Prefect (test harness), real MLflow
(SQLite in a temp dir), real great-expectations, real Trainer + PEFT steps. Training here
never deploys (registry.on_gate_pass=register_only): no Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from flows.promotion import promotion_flow
from flows.training import training_flow
from tasks.data import DataValidationError
from tasks.deploy import DeployError
from tasks.finetune import COMPLETE_MARKER, TrainingSetupError
from tasks.judge import JudgeUnavailable
from tasks.registry import find_training_run, promote_champion
from tests.conftest import ASSETS
from tests.judge_server import KEY, MODEL, free_port, judge_server
from tuneloop.config import REPO_ROOT, TuneloopConfig
from tuneloop.models import find_artifact_dir, load_adapter_model, load_base, read_base_ref
from tuneloop.state import apply_environment, tracking_uri

pytestmark = pytest.mark.slow


def updated(cfg: TuneloopConfig, **sections: dict) -> TuneloopConfig:
    """Return `cfg` with some fields of some sections replaced, validated like a loaded config."""
    data = cfg.model_dump(mode="json")
    for section, fields in sections.items():
        node = data[section]
        for key, value in fields.items():
            *path, last = key.split(".")
            for part in path:
                node = node[part]
            node[last] = value
            node = data[section]
    return TuneloopConfig.model_validate(data)


@pytest.fixture
def register_only(cfg, prefect_api):
    cfg = updated(cfg, registry={"on_gate_pass": "register_only"})
    apply_environment(cfg, prefect_api=False)
    return cfg


def test_trains_registers_and_aliases_with_lineage(register_only) -> None:
    cfg = register_only
    name = cfg.registry.model_name
    first = training_flow(cfg)
    assert first.decision == "passed" and first.version.version == "1"
    assert first.alias == "challenger" and not first.champion  # champion moves only by promotion
    # Before any champion the base model is the reference: every rule is checked against it, none skipped.
    assert first.compared_with.startswith("base") and first.rules
    assert not [line for line in first.rules if line.startswith("SKIPPED")], first.rules
    own = first.slice  # the slice this version's data made: its figures are eval/<slice>/<metric>
    client = MlflowClient(tracking_uri(cfg))
    mv = client.get_model_version_by_alias(name, "challenger")
    assert str(mv.version) == "1"
    assert client.get_registered_model(name).aliases == {"challenger": 1}
    for tag in (
        "tuneloop.base_sha256",
        "tuneloop.dataset_digest",
        "tuneloop.training_run",
        f"eval.{own}/rougeL",
        f"eval.{own}/toxicity_rate",
        f"eval.{own}/pii_leak_rate",
        "tuneloop.code_version",
        "tuneloop.gate_rules",
        "tuneloop.compared_with",
        "tuneloop.slices",
    ):
        assert mv.tags[tag], tag
    assert mv.tags["tuneloop.gate"] == "passed" and mv.tags["tuneloop.alias_reason"].startswith("challenger: passed")
    run = client.get_run(first.version.run_id)
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}  # context -> dataset
    assert set(inputs) == {"training", "evaluation"} and inputs["training"].source
    assert run.data.tags["tuneloop.validation"] == "passed" and run.data.metrics["validation/errors"] == 0
    assert "validation/dataset_report.html" in [a.path for a in client.list_artifacts(run.info.run_id, "validation")]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == cfg.train.max_steps
    assert run.data.tags["tuneloop.gate"] == "passed" and run.data.params["gate.rules"] == " ; ".join(cfg.gate.rules)
    assert f"eval/{own}/candidate.json" in [a.path for a in client.list_artifacts(run.info.run_id, f"eval/{own}")]

    # The version carries a signature and an input example, and answers through MLflow's own
    # loader, by alias.
    model = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["prompt"]
    assert model.metadata.get_params_schema().params[0].name == "max_new_tokens"
    assert model.input_example["prompt"].tolist() == ["What is the capital of France?"]
    prompts = pd.DataFrame({"prompt": ["What is 1 plus 1?", "What is the capital of Peru?"]})
    answers = model.predict(prompts, params={"max_new_tokens": 3})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    # What the promotion flow does after its deploy and smoke test (that part needs Ray).
    assert promote_champion.fn(first.version, cfg.registry, "test: served") is None
    assert client.get_registered_model(name).aliases == {"champion": 1}  # no longer a challenger

    second = training_flow(cfg)  # same data: the gate compares against v1 on the same split
    assert second.version.version == "2" and second.champion_metrics is not None
    assert {d.metric for d in second.comparison if d.slice == own} == {
        "rougeL",
        "exact_match",
        "token_f1",
        "toxicity_rate",
        "pii_leak_rate",
    }
    # and the bias figures per category, paired on the same counterfactual pairs
    assert {d.slice for d in second.comparison if d.metric == "bias_gap"} == {
        "gender",
        "nationality",
        "religion",
        "age",
    }
    assert all(d.low <= d.mean <= d.high for d in second.comparison)
    logged = client.get_run(second.version.run_id).data.metrics
    for key in (
        f"eval/{own}/bleu",
        f"eval/{own}/perplexity",
        f"eval/{own}/p95_latency_ms",
        f"eval/{own}/gain/rougeL_ci_low",
        f"eval/{own}/champion/rougeL",
        f"eval/{own}/toxicity_rate",
        f"eval/{own}/pii_leak_rate",
        "eval/bias/gender/bias_gap",
        "eval/bias/religion/gain/bias_gap_ci_low",
        "eval/bias/age/champion/stereotype_score",
    ):
        assert key in logged, key
    assert "eval_report.html" in [a.path for a in client.list_artifacts(second.version.run_id)]
    assert second.dataset_digest == first.dataset_digest
    again = {d.tags[0].value: d.dataset for d in client.get_run(second.version.run_id).inputs.dataset_inputs}
    assert again["training"].digest == inputs["training"].digest  # same data, same digest in the UI
    assert client.get_registered_model(name).aliases == (
        {"champion": 1, "challenger": 2} if second.decision == "passed" else {"champion": 1}
    )


def test_a_rejected_version_gets_no_alias_and_cannot_be_promoted(register_only) -> None:
    cfg = updated(register_only, gate={"rules": ["rougeL >= 2"]})  # no model reaches that
    result = training_flow(cfg)
    assert result.decision == "rejected" and result.alias is None and not result.champion
    # A rule without a slice holds on every slice; the line names the slice it failed on.
    assert result.rules == [
        (
            f"FAIL: rougeL >= 2 (rougeL[{result.slice}]={result.metrics['rougeL']:.6g}: "
            f"{result.metrics['rougeL']:.6g} not >= 2)"
        )
    ]
    client = MlflowClient(tracking_uri(cfg))
    mv = client.get_model_version(cfg.registry.model_name, result.version.version)
    assert mv.tags["tuneloop.gate"] == "rejected"
    assert mv.tags["tuneloop.alias_reason"] == f"no alias: the gate {result.reason}"
    assert client.get_registered_model(cfg.registry.model_name).aliases == {}
    with pytest.raises(DeployError, match="cannot become champion: the gate rejected: rougeL >= 2"):
        promotion_flow(cfg, result.version.version)  # refused before anything is deployed
    with pytest.raises(DeployError, match="No version of tuneloop-chat holds the 'challenger' or 'champion'"):
        promotion_flow(cfg)
    with pytest.raises(DeployError, match="tuneloop-chat has no version 99"):
        promotion_flow(cfg, "99")


def test_a_judge_on_an_openai_compatible_endpoint_gates_the_candidate(register_only, monkeypatch) -> None:
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with judge_server() as (url, requests):
        cfg = updated(
            register_only,
            eval={
                "judge.backend": "openai",
                "judge.base_url": url,
                "judge.model": MODEL,
                "judge.api_key_env": "TEST_JUDGE_KEY",
            },
            gate={"rules": ["judge_score >= 3", "hallucination_rate <= 0.5"]},
        )
        result = training_flow(cfg)
    assert result.decision == "passed", result.reason
    assert result.metrics["judge_score"] == 4 and result.metrics["judge_failed"] == 0
    # A probe before training; then the candidate and its reference (the base model here) are each
    # judged: a probe before judging, then two rubrics per example.
    assert len(requests) == 1 + 2 * (1 + 2 * cfg.eval.max_examples)
    run = MlflowClient(tracking_uri(cfg)).get_run(result.version.run_id)
    assert run.data.params["judge.rubric"] == "answer_quality_v1"
    assert run.data.params["judge.hallucination_rubric"] == "hallucination_v1"
    own = result.slice
    assert run.data.metrics[f"eval/{own}/judge_score"] == 4 and run.data.metrics[f"eval/{own}/judge_failed"] == 0
    tags = MlflowClient(tracking_uri(cfg)).get_model_version(cfg.registry.model_name, "1").tags
    assert tags["tuneloop.judge_rubrics"].startswith("answer_quality_v1@")


def test_an_unreachable_judge_fails_before_training_or_generation(register_only, monkeypatch) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    cfg = updated(register_only, eval={"judge.backend": "openai", "judge.base_url": closed})
    with pytest.raises(JudgeUnavailable, match="cannot be reached"):
        training_flow(cfg)
    assert (
        MlflowClient(tracking_uri(cfg)).search_runs(
            [e.experiment_id for e in MlflowClient(tracking_uri(cfg)).search_experiments()]
        )
        == []
    )
    assert not list((cfg.home / "runs").iterdir())


def test_missing_field_fails_before_training(register_only, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (ASSETS / "tiny_qa.jsonl").read_text().splitlines()]
    rows[3].pop("response")
    rows[7]["response"] = ""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = register_only.model_copy(update={"data": register_only.data.model_copy(update={"path": str(bad)})})
    with pytest.raises(DataValidationError) as err:
        training_flow(cfg)
    message = str(err.value)
    assert str(bad) in message and 'field "response"' in message and "4" in message and "8" in message
    client = MlflowClient(tracking_uri(cfg))
    assert client.search_registered_models() == []  # nothing trained or registered
    assert not list((cfg.home / "runs").iterdir())
    # The failed run keeps the evidence: the report, the reason, and no training metric.
    [run] = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["tuneloop.validation"] == "failed"
    assert 'field "response"' in run.data.tags["tuneloop.failure"]
    assert not client.get_metric_history(run.info.run_id, "train/loss")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "validation")]


def test_contract_violation_fails_before_training(register_only, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (ASSETS / "tiny_qa.jsonl").read_text().splitlines()]
    rows[5]["prompt"] = "Please explain at length why the sky looks blue on a clear day. " * 5
    bad = tmp_path / "long.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = register_only.model_copy(update={"data": register_only.data.model_copy(update={"path": str(bad)})})
    with pytest.raises(DataValidationError, match="contract loss_mask \\(error\\).*first offending rows: 6"):
        training_flow(cfg)
    assert MlflowClient(tracking_uri(cfg)).search_registered_models() == []


def test_missing_file_fails_naming_it(register_only, tmp_path: Path) -> None:
    cfg = register_only.model_copy(
        update={"data": register_only.data.model_copy(update={"path": str(tmp_path / "absent.jsonl")})}
    )
    with pytest.raises(DataValidationError, match="absent.jsonl does not exist"):
        training_flow(cfg)


def test_full_fine_tuning_registers_a_version_that_loads_back_bit_exact(register_only, tmp_path: Path) -> None:
    cfg = updated(register_only, train={"method": "full", "target_modules": "auto", "learning_rate": 1e-3})
    result = training_flow(cfg)
    assert result.decision in ("passed", "rejected") and result.rules and "rougeL" in result.metrics  # gated
    name, version = cfg.registry.model_name, result.version.version
    client = MlflowClient(tracking_uri(cfg))
    mv = client.get_model_version(name, version)
    run = client.get_run(result.version.run_id)
    artifact = cfg.home / "runs" / run.data.tags["tuneloop.training_key"] / "artifact"  # what the flow trained
    base = read_base_ref(artifact)
    assert mv.tags["tuneloop.method"] == "full" and mv.tags["tuneloop.artifact"] == "full"
    assert mv.tags["tuneloop.base_model"] == base.location and mv.tags["tuneloop.base_sha256"] == base.sha256
    assert mv.tags["tuneloop.base_revision"] == "builtin:tiny-llama"
    assert mv.tags["tuneloop.dataset_digest"] == result.dataset_digest
    assert mv.tags["tuneloop.training_run"] == run.info.run_id == mv.run_id
    assert mv.tags["tuneloop.gate"] == result.decision and run.info.status == "FINISHED"
    assert "fully fine-tuned weights on `" in mv.description  # its model card says what it is

    trained, tok = load_adapter_model(artifact)
    ids = tok("What is the capital of Peru?", return_tensors="pt").input_ids
    registered = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().model
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl")))
    served, _ = load_adapter_model(find_artifact_dir(local))  # what serving/app.py calls
    with torch.no_grad():
        expected = trained(ids).logits
        assert torch.equal(registered(ids).logits, expected) and torch.equal(served(ids).logits, expected)
        assert not torch.equal(load_base(base)[0].eval()(ids).logits, expected)  # every weight trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_a_method_this_machine_cannot_run_fails_before_any_work(register_only) -> None:
    cfg = updated(register_only, train={"method": "qlora"})
    with pytest.raises(TrainingSetupError, match="qlora needs a CUDA GPU"):
        training_flow(cfg)
    client = MlflowClient(tracking_uri(cfg))
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not list((cfg.home / "runs").iterdir()) and not list((cfg.home / "reports").iterdir())


def test_a_flow_that_fails_after_its_run_started_ends_the_run_failed(register_only) -> None:
    # Every example truncated to 8 tokens keeps no answer token (the loss-mask contract that
    # would refuse this data first is off): the finetune task fails, and is not retried.
    cfg = updated(register_only, train={"max_seq_len": 8}, validation={"loss_mask.level": "off"})
    with pytest.raises(ValueError, match="No training example fits max_seq_len=8"):
        training_flow(cfg)
    client = MlflowClient(tracking_uri(cfg))
    [run] = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    assert run.info.status == "FAILED" and "No training example fits" in run.data.tags["tuneloop.failure"]


def _engine_env(prefect_api: str, flow_run_id: str) -> dict[str, str]:
    # One torch thread in every run, so the runs compare bit for bit.
    return {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT__FLOW_RUN_ID": flow_run_id,
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
    }


# How a worker starts a flow run: a process that runs the flow code under the run's id.
ENGINE = [sys.executable, "-m", "prefect.flow_engine", "flows/training.py:training_flow"]
# How a user runs a crashed flow run again (the UI's "Retry" puts it back for a worker instead).
RETRY = [
    str(Path(sys.executable).parent / "prefect"),
    "flow-run",
    "retry",
    "--entrypoint",
    "flows/training.py:training_flow",
]


def test_a_killed_flow_run_resumes_from_its_checkpoint_when_run_again(register_only, prefect_api) -> None:
    """The process running a training flow run is SIGKILLed after a checkpoint; the same flow run,
    run again, resumes from that checkpoint in the same MLflow run and ends like an uninterrupted run."""
    from prefect import get_client
    from prefect.states import Crashed

    # 40 steps of 4 examples, 4 epochs of tiny_qa: the resumed run must restore the data order and
    # dropout's random state.
    cfg = updated(register_only, train={"max_steps": 40, "save_steps": 5, "lora_dropout": 0.1})
    params = {"config": cfg.model_dump(mode="json")}
    with get_client(sync_client=True) as prefect:
        reference, killed = (prefect.create_flow_run(training_flow, parameters=params) for _ in range(2))
    done = subprocess.run(
        ENGINE,
        cwd=REPO_ROOT,
        env=_engine_env(prefect_api, str(reference.id)),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    work = cfg.home / "runs" / str(killed.id)  # keyed on the flow run id
    proc = subprocess.Popen(
        ENGINE,
        cwd=REPO_ROOT,
        env=_engine_env(prefect_api, str(killed.id)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list(work.glob(f"checkpoints/checkpoint-*/{COMPLETE_MARKER}")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (work / "artifact").exists(), "the training ended before it was killed: the test proves nothing"
    saved = max(int(p.parent.name.split("-")[1]) for p in work.glob(f"checkpoints/checkpoint-*/{COMPLETE_MARKER}"))
    client = MlflowClient(tracking_uri(cfg))
    run_id = find_training_run(str(killed.id), cfg.registry.experiment, tracking_uri(cfg)).info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing ended it: the process died

    with get_client(sync_client=True) as prefect:  # what the worker reports when its flow process dies
        prefect.set_flow_run_state(killed.id, Crashed(message="Flow run process exited with -9"), force=True)
    again = subprocess.run(
        [*RETRY, str(killed.id)],
        cwd=REPO_ROOT,
        env=_engine_env(prefect_api, str(killed.id)),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(killed.id).state.is_completed()

    # One MLflow run for the flow run, resumed: it names the checkpoint and holds each step saved
    # before the kill once (a training from scratch would have logged them again).
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["tuneloop.flow_run_id"] == str(killed.id)
    assert run.data.tags["tuneloop.train.resumed_from"] == f"checkpoint-{saved}"
    assert len(client.search_runs([run.info.experiment_id], f"tags.`tuneloop.training_key` = '{killed.id}'")) == 1
    steps = Counter(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert set(steps) == set(range(1, 41)) and all(steps[s] == 1 for s in range(1, saved + 1))
    [version] = client.search_model_versions(f"run_id = '{run_id}'")
    assert version.tags["tuneloop.training_run"] == run_id

    ref_run = find_training_run(str(reference.id), cfg.registry.experiment, tracking_uri(cfg))
    assert ref_run.data.tags["tuneloop.train.resumed_from"] == "none: from scratch"
    assert abs(run.data.metrics["train/final_loss"] - ref_run.data.metrics["train/final_loss"]) <= 1e-5
    before = load_file(cfg.home / "runs" / str(reference.id) / "artifact" / "adapter" / "adapter_model.safetensors")
    after = load_file(work / "artifact" / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_version_trains_and_gates_with_its_prompt_and_a_prompt_only_candidate_is_gated_too(
    register_only, monkeypatch
) -> None:
    """Training renders the data as serving will (the prompt version is lineage); a new prompt alone
    goes through the champion's slices and the same gate rules, its verdict on the prompt version."""
    from flows.prompts import prompt_evaluation_flow
    from tasks.prompts import prompt_tags, register_prompt
    from tuneloop.prompts import PromptVariablesError

    framed = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Question: {{input}}"}]
    v1, _ = register_prompt(register_only, "assistant", framed, "first", "ana")
    cfg = updated(register_only, serve={"prompt": "assistant/1"})
    first = training_flow(cfg)
    client = MlflowClient(tracking_uri(cfg))
    tags = client.get_model_version(cfg.registry.model_name, first.version.version).tags
    assert tags["tuneloop.prompt_version"] == "assistant/1" and tags["tuneloop.prompt_sha256"] == v1.sha256
    examples = client.download_artifacts(first.version.run_id, f"eval/{first.slice}/candidate.json")
    table = json.loads(Path(examples).read_text())  # MLflow's table: columns and rows
    asked = json.loads(table["data"][0][table["columns"].index("messages")])
    assert asked[0] == {"role": "system", "content": "Answer briefly."} and asked[1]["content"].startswith("Question: ")
    # its model card: the registry page's description, the full card in the run
    mv = client.get_model_version(cfg.registry.model_name, first.version.version)
    assert mv.description.startswith(f"# {cfg.registry.model_name} v1") and "## Evaluation per slice" in mv.description
    assert "prompt version `assistant/1`" in mv.description and "Not promoted" in mv.description
    assert "model_card.md" in [a.path for a in client.list_artifacts(first.version.run_id)]
    promote_champion.fn(first.version, cfg.registry, "test: served")
    from tasks.modelcard import record_promoter

    monkeypatch.setenv("TUNELOOP_ACTOR", "reviewer ana")
    assert record_promoter.fn(cfg.registry.model_name, "1", "direct", "test: served") == "reviewer ana"
    mv = client.get_model_version(cfg.registry.model_name, "1")
    assert "Promoted to champion" in mv.description and "by **reviewer ana** (direct)" in mv.description
    assert mv.tags["tuneloop.promoted_by"] == "reviewer ana" and "Not promoted" not in mv.description

    v2, _ = register_prompt(cfg, "assistant", [{"role": "system", "content": "Answer in detail."}], "longer", "bo")
    result = prompt_evaluation_flow(cfg, v2.ref)
    assert result.prompt == "assistant/2" and result.compared_with == "assistant/1"
    assert result.decision in ("passed", "rejected", "withheld")
    gate = prompt_tags(cfg, v2)
    assert gate["tuneloop.gate"] == result.decision and gate["tuneloop.eval_run"] == result.run_id
    run = client.get_run(result.run_id)
    assert run.data.tags["tuneloop.compared_prompt"] == "assistant/1"
    assert any(k.startswith(f"eval/{first.slice}/gain/") for k in run.data.metrics)
    assert "eval_report.html" in {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(result.run_id)}

    # a prompt whose variables the config does not fill fails before anything trains
    register_prompt(cfg, "product", [{"role": "system", "content": "You answer for {{product}}."}], "v1", "ana")
    with pytest.raises(PromptVariablesError, match="missing \\['product'\\]"):
        training_flow(updated(cfg, serve={"prompt": "product/1"}))


def _paused_flow_run(timeout_s: float = 120):
    """The id of the flow run that waits in a Prefect pause (what the UI shows with its form)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=paused)
            if runs:
                return runs[0].id
            time.sleep(0.5)
    raise AssertionError("no flow run paused for approval")


def test_register_only_promotions_wait_for_a_person_who_approves_or_rejects(register_only) -> None:
    """Through the Prefect pause and its form, as a reviewer in the UI would answer it (resume with input)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from prefect.flow_runs import resume_flow_run

    with socket.socket() as probe:  # a port nothing listens on: the approved promotion finds no Ray
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    # trained with counterfactual augmentation too (the mechanism: this data's countries swap)
    cfg = updated(register_only, serve={"ray_port": closed}, data={"counterfactual_augment": ["nationality"]})
    version = training_flow(cfg).version.version
    client = MlflowClient(tracking_uri(cfg))
    tags = client.get_model_version(cfg.registry.model_name, version).tags
    assert tags["tuneloop.counterfactual_augment"] == "nationality" and int(tags["tuneloop.counterfactual_rows"]) > 0
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(promotion_flow, cfg, version)
        resume_flow_run(_paused_flow_run(), run_input={"approve": False, "reviewer": "ana", "reason": "not on Friday"})
        with pytest.raises(DeployError, match="rejected by ana: not on Friday"):
            waiting.result(timeout=120)
    tags = client.get_model_version(cfg.registry.model_name, version).tags
    assert tags["tuneloop.approval"] == "rejected by ana: not on Friday" and "tuneloop.promotion" not in tags
    assert client.get_registered_model(cfg.registry.model_name).aliases == {"challenger": int(version)}

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(promotion_flow, cfg, version)
        resume_flow_run(_paused_flow_run(), run_input={"approve": True, "reviewer": "bo", "reason": "canary it"})
        with pytest.raises(DeployError, match="No Ray cluster answers"):  # approved: on to the deploy (no Ray here)
            waiting.result(timeout=120)
    assert client.get_model_version(cfg.registry.model_name, version).tags["tuneloop.approval"] == (
        "approved by bo: canary it"
    )
