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
