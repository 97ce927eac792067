"""Serve replicas spread over a multi-node Ray cluster, simulated on one host.

Ray's own cluster test utilities (`ray.cluster_utils.Cluster`) start a head and two worker
nodes on 127.0.0.1 with token auth on, each worker a raylet of its own with a custom resource;
Serve must place four replicas at most two per node, and requests through the proxy must reach
replicas on both workers. The cluster runs in a subprocess with a private RAY_TMPDIR and its own ports, so
it neither joins nor touches another Ray on this machine, and is shut down at the end.

    .venv/bin/pytest tests/integration/test_serve_multinode.py
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKERS = 2
REPLICAS = 4
PER_NODE = 2  # max_replicas_per_node: forces the spread
REQUESTS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(out: Path) -> None:
    """Start the cluster, deploy, send traffic, write what answered to `out`; always shut down."""
    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 80 * 1024**2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node,
            "num_cpus": 1,
            "gcs_server_port": _free_port(),
            "ray_client_server_port": _free_port(),
        },
    )
    try:
        workers = [cluster.add_node(**node, num_cpus=1, resources={"serve_node": 4}) for _ in range(WORKERS)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        port = _free_port()
        # One proxy, on the head: every node shares 127.0.0.1 here, so a proxy per node would clash.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})

        @serve.deployment(
            num_replicas=REPLICAS,
            max_replicas_per_node=PER_NODE,
            ray_actor_options={"num_cpus": 0.25, "resources": {"serve_node": 1}},
        )
        class WhereAmI:
            def __call__(self, request: object) -> str:
                return ray.get_runtime_context().get_node_id()

        serve.run(WhereAmI.bind(), name="where", route_prefix="/where")
        status = serve.status().applications["where"].deployments["WhereAmI"]
        answered = [httpx.get(f"http://127.0.0.1:{port}/where", timeout=30).text for _ in range(REQUESTS)]
        out.write_text(
            json.dumps(
                {
                    "head": cluster.head_node.node_id,
                    "workers": [w.node_id for w in workers],
                    "replica_states": {getattr(k, "value", str(k)): v for k, v in status.replica_states.items()},
                    "answered": answered,
                }
            )
        )
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def test_serve_replicas_spread_over_the_nodes_of_a_cluster(tmp_path: Path) -> None:
    # Ray's unix sockets live under RAY_TMPDIR: a short path of our own (<= 107 bytes), and Ray's
    # "current cluster" file there, not in the /tmp/ray another Ray on this machine uses.
    ray_tmp = Path(tempfile.mkdtemp(prefix="tl-rmn-"))
    out = tmp_path / "result.json"
    # Token auth on every node, as in infra/kuberay/: the same token in every process's environment.
    env = {
        **os.environ,
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600, check=False
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["replica_states"] == {"RUNNING": REPLICAS}
    answered = Counter(result["answered"])
    assert sum(answered.values()) == REQUESTS
    # Replicas landed on both worker nodes (none on the head, which has no serve_node), and the
    # proxy sent requests to each.
    assert set(answered) <= set(result["workers"]) and result["head"] not in answered
    assert len(answered) >= 2, answered


if __name__ == "__main__":
    drive(Path(sys.argv[1]))
