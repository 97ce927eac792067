import pytest

from tasks.deploy import DeployError, ray_client, serving_version
from tuneloop.config import ServeConfig


def test_no_ray_cluster_is_a_clear_error_at_once() -> None:
    with (
        pytest.raises(DeployError, match=r"No Ray cluster answers at 127.0.0.1:1.*tuneloop up"),
        ray_client("127.0.0.1:1"),
    ):
        pass


def test_nothing_serving_reads_as_none() -> None:
    assert serving_version.fn(ServeConfig(port=1)) is None


def test_a_ray_call_after_the_driver_left_starts_no_ray_of_its_own() -> None:
    """A Serve handle's router polls its controller after `ray_client` disconnects; with Ray's
    auto-connect (on by default) that call would start a second, local Ray in this process."""
    import os
    import subprocess
    import sys

    from tuneloop.state import DEFAULT_ENV

    code = (
        "import ray\ntry:\n    ray.put(1)\nexcept Exception as err:\n    print(type(err).__name__)\n"
        "print(ray.is_initialized())"
    )
    env = {**os.environ, **DEFAULT_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["RaySystemError", "False"], out.stderr[-2000:]


def test_arm_figures_count_guardrail_blocks_tokens_and_cost(tmp_path) -> None:
    import datetime as dt

    from tasks.deploy import arm_figures
    from tuneloop.inferencelog import InferenceLog, InferenceRecord

    url = f"sqlite:///{tmp_path / 'log.db'}"
    store = InferenceLog(url)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    for i in range(10):
        for arm, version in (("champion", "1"), ("challenger", "2")):
            store.append(
                InferenceRecord(
                    route="/v1/chat/completions",
                    model="m",
                    prompt="p",
                    status=200,
                    model_version=version,
                    prompt_tokens=10,
                    completion_tokens=20 if arm == "champion" else 40,
                    latency_ms=50,
                    arm=arm,
                    guardrail="toxicity_blocked" if arm == "challenger" and i < 3 else None,
                )
            )
    store.close()
    figs = arm_figures(url, since, ("champion", "challenger"), {"2": 2.0, "*": 1.0})
    champ, cand = figs["champion"].metrics(), figs["challenger"].metrics()
    assert champ["blocked_rate"] == 0 and cand["blocked_rate"] == pytest.approx(0.3)
    assert champ["completion_tokens_mean"] == 20 and cand["completion_tokens_mean"] == 40
    assert champ["cost_per_1k_requests"] == pytest.approx(30.0) and cand["cost_per_1k_requests"] == pytest.approx(100.0)
    unpriced = arm_figures(url, since, ("champion", "challenger"))["champion"].metrics()
    assert "cost_per_1k_requests" not in unpriced  # a rule over it is skipped, not judged on zero
