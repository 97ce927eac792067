"""Serve's own autoscaler on the model replicas (serve.autoscaling), exercised for real on loopback:
a load ramp adds a replica, the quiet after it removes one, and no request fails meanwhile."""

from __future__ import annotations

import time

import pytest

from flows.promotion import promotion_flow
from tasks.deploy import endpoint, ray_client
from tasks.traffic import ChatLoad
from tests.conftest import make_config
from tests.integration.test_serving import NAME, _adapter, _register
from tuneloop import services
from tuneloop.models import resolve_base
from tuneloop.state import apply_environment

pytestmark = pytest.mark.slow

AUTOSCALING = (
    "serve.autoscaling={min_replicas: 1, max_replicas: 2, target_ongoing_requests: 1, "
    "upscale_delay_s: 1, downscale_delay_s: 5, look_back_period_s: 2}"
)


def _running(cfg) -> int:
    from ray import serve

    with ray_client(f"127.0.0.1:{cfg.serve.ray_port}"):
        app = serve.status().applications[cfg.serve.app_name]
        return app.deployments["ModelServer"].replica_states.get("RUNNING", 0)


class Timeline(list):
    """(seconds since the start, RUNNING model replicas), polled once a second."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg, self.start = cfg, time.monotonic()

    def until(self, replicas: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.append((round(time.monotonic() - self.start, 1), _running(self.cfg)))
            if self[-1][1] == replicas:
                return True
            time.sleep(1)
        return False


def test_a_load_ramp_scales_model_replicas_up_and_back_down(tmp_path_factory, models_dir, prefect_api) -> None:
    home = tmp_path_factory.mktemp("autoscaling") / "home"
    cfg = make_config(home, models_dir, AUTOSCALING, "serve.rate_per_minute=100000", "serve.burst=10000")
    apply_environment(cfg, prefect_api=False)
    base = resolve_base("builtin:tiny-llama", models_dir)
    version = _register(cfg, _adapter(base, tmp_path_factory.mktemp("artifact") / "a", seed=0))
    services.start_ray(cfg, num_cpus=4)
    try:
        assert promotion_flow(cfg, version).serving == version
        timeline = Timeline(cfg)
        assert timeline.until(1, 60), timeline  # min_replicas while idle
        prompts = [f"Count from {i} to {i + 20}, one number per line." for i in range(8)]
        with ChatLoad(endpoint(cfg.serve), NAME, prompts, 48, clients=6, timeout_s=120) as load:
            scaled_up = timeline.until(2, 120)
            time.sleep(3)  # requests go on while the new replica takes its share
        assert scaled_up, f"never scaled up: {timeline}"
        assert timeline.until(1, 120), f"never scaled back down: {timeline}"
        answered = [a for a in load.answers if a.status == 200]
        assert load.answers and len(answered) == len(load.answers), [a for a in load.answers if a.status != 200]
        assert max(n for _, n in timeline) == 2  # bounded by max_replicas
        print("replicas over time (s, running):", timeline, f"; {len(answered)} requests, none failed")
    finally:
        services.stop_ray(cfg)
