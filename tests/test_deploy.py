import pytest

from tasks.deploy import DeployError, ray_client, serving_version
from tuneloop.config import ServeConfig


def test_no_ray_cluster_is_a_clear_error_at_once() -> None:
    with pytest.raises(DeployError, match=r"No Ray cluster answers at 127.0.0.1:1.*tuneloop up"), \
            ray_client("127.0.0.1:1"):
        pass


def test_nothing_serving_reads_as_none() -> None:
    assert serving_version.fn(ServeConfig(port=1)) is None
