"""Ray Serve's own latency floor: no-op deployments in a bare local Ray, no tuneloop code.

    .venv/bin/python bench/serve_noop.py                                   # Serve's defaults
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1 .venv/bin/python bench/serve_noop.py # a Serve flag (env)

Three no-op apps behind Serve's HTTP proxy on 127.0.0.1: a deployment with an async
`__call__`, a FastAPI ingress with an async route and one with a sync route (run in a thread
pool), and the same FastAPI app on uvicorn alone. p50/p90 of `--rounds` × `--requests`
sequential GETs, the apps interleaved round by round so that a drift of the machine's
speed touches all alike. `bench/serve.py` measures the same apps inside tuneloop's cluster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def noop_apps() -> dict[str, Any]:
    """Serve applications that do nothing, by route name: plain, fastapi-async, fastapi-sync."""
    from fastapi import FastAPI
    from ray import serve

    sync_app, async_app = FastAPI(), FastAPI()

    @sync_app.get("/")
    def ok_sync() -> dict:
        return {"ok": True}

    @async_app.get("/")
    async def ok_async() -> dict:
        return {"ok": True}

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Plain:  # the least a deployment can be: no FastAPI app, an async call
        async def __call__(self, request) -> str:
            return "ok"

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(async_app)
    class FastAPIAsync:
        pass

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(sync_app)
    class FastAPISync:
        pass

    return {"plain": Plain.bind(), "fastapi-async": FastAPIAsync.bind(), "fastapi-sync": FastAPISync.bind()}


@contextmanager
def uvicorn_noop(port: int) -> Iterator[str]:
    """The same no-op FastAPI app (sync route) on uvicorn alone, in a subprocess; yields its URL."""
    import httpx

    code = (
        "from fastapi import FastAPI\nimport uvicorn\napp = FastAPI()\n@app.get('/')\ndef ok():\n"
        f"    return {{'ok': True}}\nuvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=60, help="GETs per app per round")
    parser.add_argument("--port", type=int, default=28777)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway Ray on loopback
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import httpx
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        with uvicorn_noop(args.port + 1) as plain_url:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            urls = {}
            for name, app in noop_apps().items():
                serve.run(app, name=name, route_prefix=f"/{name}")
                urls[name] = f"http://127.0.0.1:{args.port}/{name}/"
            urls["uvicorn (no Serve)"] = plain_url
            times: dict[str, list[float]] = {name: [] for name in urls}
            with httpx.Client(timeout=30) as http:
                for url in urls.values():
                    for _ in range(20):
                        http.get(url).raise_for_status()
                for _ in range(args.rounds):
                    for name, url in urls.items():
                        for _ in range(args.requests):
                            t = time.perf_counter()
                            http.get(url).raise_for_status()
                            times[name].append((time.perf_counter() - t) * 1000)
        flags = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
        print(f"Serve flags: {flags or 'defaults'}")
        for name, ms in times.items():
            print(f"{name:20} p50 {statistics.median(ms):6.2f} ms   p90 {sorted(ms)[int(0.9 * len(ms))]:6.2f} ms")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
