"""The registry against a real MLflow SQLite store in a temp dir: a registered adapter or full
fine-tune loads back bit-exact by `models:/name/version`, a changed base is refused, a restarted
training resumes its unfinished run, and flows that register and alias at the same time lose
nothing and cross nothing."""

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from tasks.registry import (
    end_unfinished_run,
    fetch_adapter,
    promote_champion,
    register_adapter,
    registry_lock,
    set_challenger,
    start_training_run,
)
from tuneloop.config import RegistryConfig
from tuneloop.models import (
    BaseModelError,
    BaseRef,
    load_adapter_model,
    load_base,
    resolve_base,
    save_adapter_artifact,
    save_full_artifact,
    weights_sha256,
)

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 12]])


@pytest.fixture
def tracking(tmp_path: Path):
    """A fresh SQLite tracking store and artifact root for one test."""
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = MlflowClient().create_experiment("registry-test", artifact_location=str(tmp_path / "artifacts"))
    yield uri, experiment
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def base_copy(models_dir: Path, tmp_path: Path) -> BaseRef:
    """A private copy of the tiny base model: tests may change its weights."""
    tiny = resolve_base("builtin:tiny-llama", models_dir)
    copy = tmp_path / "base"
    shutil.copytree(tiny.location, copy)
    return BaseRef(str(copy), weights_sha256(copy))


def make_adapter(base: BaseRef, out: Path, seed: int = 0):
    """Return a PEFT model with non-zero LoRA weights on `base`, saved as an artifact in `out`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model, tok = load_base(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    save_adapter_artifact(peft_model, tok, base, out)
    return peft_model


def new_run(experiment: str) -> str:
    return MlflowClient().create_run(experiment).info.run_id


def test_a_registered_adapter_loads_back_bit_exact_and_refuses_a_changed_base(tracking, base_copy, tmp_path) -> None:
    _, experiment = tracking
    in_memory = make_adapter(base_copy, tmp_path / "artifact")
    with torch.no_grad():
        expected = in_memory(IDS).logits
    ref = register_adapter.fn(
        RegistryConfig(model_name="roundtrip"),
        new_run(experiment),
        tmp_path / "artifact",
        {"rougeL": 0.5},
        {"tuneloop.trigger": "test"},
        ["a prompt"],
    )
    assert ref.uri == "models:/roundtrip/1"

    # Through MLflow's own loader, by version URI...
    loaded = mlflow.pyfunc.load_model(ref.uri).unwrap_python_model().model
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)
    # ...and the way Ray Serve replicas load it.
    served, _ = load_adapter_model(fetch_adapter(ref.uri, tmp_path / "download"))
    with torch.no_grad():
        assert torch.equal(served(IDS).logits, expected)

    weights = next(Path(base_copy.location).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the base weights
    weights.write_bytes(bytes(data))
    with pytest.raises(BaseModelError, match="changed since the adapter was trained"):
        mlflow.pyfunc.load_model(ref.uri)
    with pytest.raises(BaseModelError, match="changed since the adapter was trained"):
        load_adapter_model(fetch_adapter(ref.uri, tmp_path / "download-again"))


def test_a_registered_full_fine_tune_loads_back_bit_exact(tracking, base_copy, tmp_path) -> None:
    _, experiment = tracking
    torch.manual_seed(0)
    model, tok = load_base(base_copy)
    with torch.no_grad():  # weights unlike the base's, as full fine-tuning leaves them
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    save_full_artifact(model, tok, base_copy, tmp_path / "artifact")
    ref = register_adapter.fn(
        RegistryConfig(model_name="full"),
        new_run(experiment),
        tmp_path / "artifact",
        {"rougeL": 0.5},
        {"tuneloop.method": "full"},
        ["a prompt"],
    )
    pyfunc = mlflow.pyfunc.load_model(ref.uri)
    assert pyfunc.metadata.metadata["tuneloop_format"] == "full-weights+base-ref/1"
    with torch.no_grad():
        assert torch.equal(pyfunc.unwrap_python_model().model(IDS).logits, expected)
    served, _ = load_adapter_model(fetch_adapter(ref.uri, tmp_path / "download"))  # as Ray Serve loads it
    assert not hasattr(served, "peft_config")
    with torch.no_grad():
        assert torch.equal(served(IDS).logits, expected)
    tags = MlflowClient().get_model_version("full", ref.version).tags
    assert tags["tuneloop.artifact"] == "full" and tags["tuneloop.method"] == "full"


def test_a_restarted_training_resumes_its_unfinished_run(tracking) -> None:
    cfg = RegistryConfig(experiment="restart")
    params = {"train.max_steps": 40, "train.method": "lora"}
    first = start_training_run.fn(cfg, "train-a", params, "flow-run-1", tags={"tuneloop.trigger": "test"})
    client = MlflowClient()
    run = client.get_run(first)
    assert run.info.status == "RUNNING" and run.data.tags["tuneloop.training_key"] == "flow-run-1"
    assert run.data.params == {"train.max_steps": "40", "train.method": "lora"}
    assert "mlflow.user" in run.data.tags  # the context tags `mlflow.start_run` sets

    assert start_training_run.fn(cfg, "train-a", params, "flow-run-1") == first  # killed: still RUNNING
    end_unfinished_run("flow-run-1", "restart", "FAILED", "evaluation failed")
    failed = client.get_run(first)
    assert failed.info.status == "FAILED" and failed.data.tags["tuneloop.failure"] == "evaluation failed"
    end_unfinished_run("flow-run-1", "restart", "KILLED", "later")  # an ended run keeps its own reason
    assert client.get_run(first).data.tags["tuneloop.failure"] == "evaluation failed"

    assert start_training_run.fn(cfg, "train-a", params, "flow-run-1") == first  # retried after a failure
    resumed = client.get_run(first)
    assert resumed.info.status == "RUNNING" and "tuneloop.failure" not in resumed.data.tags
    other = start_training_run.fn(cfg, "train-b", params, "flow-run-2")
    assert other != first
    client.set_terminated(first)  # registered: the record is closed
    assert start_training_run.fn(cfg, "train-a", params, "flow-run-1") not in (first, other)


def test_a_version_whose_base_does_not_match_still_registers(tracking, base_copy, tmp_path) -> None:
    # MLflow answers the input example once at logging time and only warns when that fails:
    # a broken version is registered (and refused at load), as the loop's rollback test needs.
    _, experiment = tracking
    make_adapter(base_copy, tmp_path / "artifact")
    broken = BaseRef(base_copy.location, "0" * 64)
    (tmp_path / "artifact" / "base.json").write_text(json.dumps(broken.to_json()))
    ref = register_adapter.fn(
        RegistryConfig(model_name="broken"),
        new_run(experiment),
        tmp_path / "artifact",
        {"rougeL": 0.0},
        {"tuneloop.trigger": "test"},
        ["p"],
    )
    assert ref.version == "1"


def test_flows_registering_and_aliasing_at_once_lose_and_cross_nothing(tracking, models_dir, tmp_path) -> None:
    """Threads as concurrent flows: each registers a version, then all of them alias at once."""
    _, experiment = tracking
    cfg = RegistryConfig(model_name="race")
    make_adapter(resolve_base("builtin:tiny-llama", models_dir), tmp_path / "artifact")
    passes = [True, False, True, True, False, True]
    runs = [new_run(experiment) for _ in passes]
    barrier = threading.Barrier(len(passes))

    def flow(i: int) -> tuple:
        ref = register_adapter.fn(
            cfg,
            runs[i],
            tmp_path / "artifact",
            {"rougeL": i / 10},
            {"tuneloop.training_run": runs[i], "tuneloop.gate": str(passes[i])},
            [f"p{i}"],
        )
        barrier.wait(timeout=120)  # every flow decides its alias in the same instant
        return ref, set_challenger.fn(ref, cfg, f"flow {i}") if passes[i] else None

    with ThreadPoolExecutor(len(passes)) as pool:
        futures = [pool.submit(flow, i) for i in range(len(passes))]
        results = {i: f.result(timeout=300) for i, f in enumerate(futures)}  # re-raises a flow's error
    client = MlflowClient()
    assert sorted(int(ref.version) for ref, _ in results.values()) == list(range(1, len(passes) + 1))
    for i, (ref, _) in results.items():  # each version carries its own flow's run, metrics and verdict
        mv = client.get_model_version("race", ref.version)
        assert mv.run_id == runs[i] and mv.tags["tuneloop.training_run"] == runs[i]
        assert mv.tags["eval.rougeL"] == f"{i / 10:.6g}" and mv.tags["tuneloop.gate"] == str(passes[i])
    passed = {int(ref.version): i for i, (ref, _) in results.items() if passes[i]}
    newest = max(passed)
    assert client.get_registered_model("race").aliases == {"challenger": newest}
    assert results[passed[newest]][1] is True
    for version, i in passed.items():  # each passed version says whether it took the alias, or why not
        reason = client.get_model_version("race", str(version)).tags["tuneloop.alias_reason"]
        if results[i][1]:  # took it (a newer one may have taken it since)
            assert reason == f"challenger: flow {i}"
        else:
            assert "a newer version that also passed, is challenger" in reason

    # Promotion of the challenger while another flow makes a newer version challenger: the
    # champion moves, and the newer challenger is not dropped with the old one.
    late = register_adapter.fn(
        cfg, new_run(experiment), tmp_path / "artifact", {"rougeL": 0.9}, {"tuneloop.gate": "passed"}, ["late"]
    )
    start = threading.Barrier(2)

    def promote() -> None:
        start.wait(timeout=60)
        promote_champion.fn(results[passed[newest]][0], cfg, "served")

    def challenge() -> None:
        start.wait(timeout=60)
        set_challenger.fn(late, cfg, "late flow")

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(promote), pool.submit(challenge)]:
            future.result(timeout=120)
    assert client.get_registered_model("race").aliases == {"champion": newest, "challenger": int(late.version)}


def test_the_sqlite_registry_lock_excludes_other_holders(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder_timeout = 30
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with registry_lock(uri, "tuneloop-chat"):
            held.set()
            release.wait(holder_timeout)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(holder_timeout)
    with pytest.raises(TimeoutError), registry_lock(uri, "tuneloop-chat", timeout_s=0.5):
        pass
    with registry_lock(uri, "other-model", timeout_s=0.5):  # one lock per model name
        pass
    release.set()
    thread.join()
    with registry_lock(uri, "tuneloop-chat", timeout_s=5):
        pass
    assert (tmp_path / "locks" / "registry-tuneloop-chat.lock").exists()


def test_an_encrypted_version_loads_back_bit_exact_only_with_its_key(
    tracking, base_copy, tmp_path, monkeypatch
) -> None:
    """registry.encrypt_artifacts: the stored weights are ciphertext; loading decrypts them to the
    very bytes that were registered (with the key), the registered digest still checks the plain
    files, MLflow's own loader works, a wrong or missing key is refused."""
    from cryptography.fernet import Fernet

    from tuneloop.models import DIGEST_TAG, ArtifactKeyError, verify_artifact

    _, experiment = tracking
    monkeypatch.setenv("TUNELOOP_ARTIFACT_KEY", Fernet.generate_key().decode())
    make_adapter(base_copy, tmp_path / "artifact")
    original = tmp_path / "artifact"
    cfg = RegistryConfig(model_name="sealed", encrypt_artifacts=True)
    ref = register_adapter.fn(cfg, new_run(experiment), original, {}, {"tuneloop.trigger": "t"}, ["p"])
    mv = MlflowClient().get_model_version("sealed", ref.version)
    assert mv.tags["tuneloop.encrypted"] == "true"
    stored = Path(MlflowClient().get_model_version_download_uri("sealed", ref.version).removeprefix("file://"))
    assert not list(stored.rglob("*.safetensors")) and list(stored.rglob("adapter_model.safetensors.enc"))
    plain = fetch_adapter(ref.uri, tmp_path / "download")
    verify_artifact(plain, mv.tags[DIGEST_TAG], "sealed v1")  # what replicas check, on the decrypted files
    files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
    assert files and all((plain / f).read_bytes() == (original / f).read_bytes() for f in files)  # bit-exact
    assert mlflow.pyfunc.load_model(ref.uri).unwrap_python_model().model is not None  # MLflow's loader decrypts too
    monkeypatch.setenv("TUNELOOP_ARTIFACT_KEY", Fernet.generate_key().decode())
    with pytest.raises(ArtifactKeyError, match="does not decrypt with TUNELOOP_ARTIFACT_KEY"):
        fetch_adapter(ref.uri, tmp_path / "download-wrong-key")
    monkeypatch.delenv("TUNELOOP_ARTIFACT_KEY")
    with pytest.raises(ArtifactKeyError, match="TUNELOOP_ARTIFACT_KEY is not set"):
        fetch_adapter(ref.uri, tmp_path / "download-no-key")
