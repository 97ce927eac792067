"""The whole loop on the tiny model, through the same code as `tuneloop demo`: real Prefect
(test harness + a flow runner serving the deployments), real MLflow (SQLite), real Ray Serve
on 127.0.0.1, real MiniLM embeddings; then a version that cannot start must not displace
the serving one."""

import json
import shutil
import time

import httpx
import pytest
from mlflow import MlflowClient

from flows.promotion import promotion_flow
from tasks.data import DemoData
from tasks.deploy import DeployError, endpoint, serving_version
from tasks.registry import fetch_adapter, register_adapter
from tests.conftest import ASSETS, LOCAL_CONFIG, TINY, make_config
from tuneloop import services
from tuneloop.cli import run_demo
from tuneloop.inferencelog import InferenceLog
from tuneloop.models import BASE_REF_FILE
from tuneloop.state import apply_environment, inference_db_url, tracking_uri

pytestmark = pytest.mark.slow

TRIVIA = [
    f"What is {a} plus {b}?" for a, b in [(3, 9), (11, 4), (7, 7), (15, 2), (6, 13), (9, 1), (12, 12), (5, 18), (2, 17)]
] + [f"What is the capital of {c}?" for c in ("Chile", "Greece", "India")]
MEDICATION = [
    json.loads(line)["prompt"].replace("What is", "Tell me what")
    for line in (ASSETS / "tiny_medication.jsonl").read_text().splitlines()
][:12]


@pytest.fixture(scope="module")
def loop(tmp_path_factory, models_dir, prefect_api):
    """Ray and a flow runner for this module; the demo loop run once; everything stopped after."""
    home = tmp_path_factory.mktemp("loop") / "home"
    cfg = make_config(home, models_dir)
    apply_environment(cfg, prefect_api=False)
    services.start_ray(cfg, num_cpus=4)
    try:
        services.start_flow_runner(cfg, LOCAL_CONFIG, schedules=False, overrides=TINY, api_url=prefect_api)
        data = DemoData(
            ASSETS / "tiny_qa.jsonl", ASSETS / "tiny_medication.jsonl", TRIVIA, MEDICATION, "tiny_qa", "tiny_medication"
        )
        report = run_demo(cfg, data, max_tokens=4, retraining_timeout_s=600)
        yield cfg, report
    finally:
        services.stop_service(cfg, "runner")
        services.stop_ray(cfg)


def test_loop_registers_two_versions_the_second_triggered_by_drift(loop) -> None:
    cfg, report = loop
    s = report.stages
    assert s["first_training"].champion and s["first_training"].version.version == "1"
    assert s["check_before"].drift.verdict == "no_drift", s["check_before"].drift.reason
    after = s["check_after"]
    assert after.drift.verdict == "drift", after.drift.reason
    assert after.retraining_flow_run_id and s["retraining_state"] == "Completed"
    client = MlflowClient(tracking_uri(cfg))
    reports = [a.path for a in client.list_artifacts(after.mlflow_run_id)]
    assert any(p.startswith("drift-") and p.endswith(".html") for p in reports), reports

    versions = {str(v.version): v for v in client.search_model_versions(f"name='{cfg.registry.model_name}'")}
    assert set(versions) == {"1", "2"}
    assert versions["2"].tags["tuneloop.trigger"].startswith("drift")
    assert versions["2"].tags["tuneloop.slice"].startswith("tiny_medication@")  # the labelled set's slice
    assert versions["2"].tags["tuneloop.slices"].startswith("tiny_medication@")  # gated on its own slice ...
    assert "tiny_qa@" in versions["2"].tags["tuneloop.slices"]  # ... and on the champion's
    assert versions["1"].tags["tuneloop.train.started_from"] == "base"
    assert versions["2"].tags["tuneloop.train.started_from"] == "champion v1's adapter"  # it trained on v1's
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(champion.version) == "2"
    assert s["serving"] == "2"  # the retraining run promoted its champion to Serve
    promotion = client.get_run(versions["2"].tags["tuneloop.promotion_run"])  # hot-loaded next to v1, canaried
    assert promotion.data.params["strategy"] == "hot-load + canary"
    assert promotion.data.tags["tuneloop.decision"] == "promoted"
    assert promotion.data.metrics["challenger_requests"] >= cfg.serve.rollout.min_requests


def test_the_demo_asks_about_stories_with_and_without_their_collection(loop) -> None:
    from tuneloop.state import collections_location
    from tuneloop.vectorstore import CollectionStore

    cfg, report = loop
    shown = report.stages["retrieval"]
    assert shown.chunks > 0 and len(shown.rows) == 6 and shown.prompt.startswith("story-qa/")
    for r in shown.rows:
        assert not r["alone"].startswith("(HTTP") and not r["with_retrieval"].startswith("(HTTP"), r
        assert len(r["cited"]) == 2 and all(c["source"].startswith("stories.jsonl#s") for c in r["cited"])
        assert 0 <= r["f1_alone"] <= 1 and 0 <= r["f1_with_retrieval"] <= 1
    assert CollectionStore.open(collections_location(cfg), "stories").version == shown.version


def test_endpoint_answers_and_every_request_is_logged(loop) -> None:
    cfg, report = loop
    body = {
        "model": cfg.registry.model_name,
        "messages": [{"role": "user", "content": "What is aspirin?"}],
        "max_tokens": 3,
    }
    r = httpx.post(f"{endpoint(cfg.serve)}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["completion_tokens"] <= 3

    sent = report.stages["first_traffic"].sent + report.stages["drifted_traffic"].sent
    assert report.stages["first_traffic"].failed == 0 and report.stages["drifted_traffic"].failed == 0
    log = InferenceLog(inference_db_url(cfg))
    for _ in range(60):  # the gateway writes the log in the background, in batches
        if log.get(r.headers["x-request-id"]):
            break
        time.sleep(0.5)
    rows = log.window(limit=1000)
    assert len(rows) >= sent + 1
    live = report.stages["live_traffic"]
    assert live.sent > 0 and live.failed <= live.sent * 0.1, live  # the canary's traffic (some 429s)
    newest = log.get(r.headers["x-request-id"])
    assert newest["prompt"] == "What is aspirin?" and newest["model_version"] == "2"
    assert newest["latency_ms"] > 0 and newest["prompt_tokens"] > 0


@pytest.mark.parametrize(
    "body,status",
    [
        ({"messages": []}, 422),
        ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 422),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422),
    ],
)
def test_bad_requests_get_4xx_with_a_message(loop, body, status) -> None:
    cfg, _ = loop
    r = httpx.post(f"{endpoint(cfg.serve)}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status
    assert r.json()["error"]["message"]


def test_malformed_json_is_a_4xx(loop) -> None:
    cfg, _ = loop
    r = httpx.post(
        f"{endpoint(cfg.serve)}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= r.status_code < 500 and "Traceback" not in r.text


def test_a_version_that_cannot_start_leaves_the_old_one_serving(loop, tmp_path) -> None:
    cfg, _ = loop
    # A real fault: version 3's base reference records a hash its base does not have, so
    # its replicas refuse to load (tuneloop.models) and Serve cannot start them.
    artifact = fetch_adapter(f"models:/{cfg.registry.model_name}/2", tmp_path / "v2")
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    ref = json.loads((broken / BASE_REF_FILE).read_text())
    (broken / BASE_REF_FILE).write_text(json.dumps({**ref, "sha256": "0" * 64}))
    client = MlflowClient(tracking_uri(cfg))
    run_id = client.create_run(client.get_experiment_by_name(cfg.registry.experiment).experiment_id).info.run_id
    lineage = {"tuneloop.trigger": "test", "tuneloop.gate": "passed"}  # passed, so only the fault stops it
    v3 = register_adapter.fn(cfg.registry, run_id, broken, {"rougeL": 0.0}, lineage, ["p"])

    with pytest.raises(DeployError, match="could not run the new config"):
        promotion_flow(cfg, v3.version)
    assert serving_version.fn(cfg.serve) == "2"
    tags = client.get_model_version(cfg.registry.model_name, v3.version).tags
    assert tags["tuneloop.promotion"].startswith("rolled back to 2")
