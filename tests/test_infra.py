"""Every file under infra/ and prefect.yaml parsed and checked against the real schemas, offline.

Prefect's own models (prefect.yaml, work pools), Ray Serve's ServeDeploySchema, Kubernetes'
schemas (kubernetes-validate) for core objects and pod templates, the KubeRay fields of
tests/assets/schemas/kuberay-v1.yaml for Ray's custom resources, DeepSpeed's ZeRO model.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from tuneloop.config import REPO_ROOT, load_config

INFRA = REPO_ROOT / "infra"
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
KUBERAY = INFRA / "kuberay"
SERVE_CONFIG = INFRA / "serve" / "serve-config.yaml"
KUBERAY_SCHEMA = Path(__file__).parent / "assets" / "schemas" / "kuberay-v1.yaml"
K8S_VERSION = "1.33"  # the oldest Kubernetes the manifests target


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _constraint(package: str) -> str:
    pins = dict(
        line.split("==", 1) for line in (REPO_ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    return pins[package]


# --------------------------------------------------------------------------- Kubernetes schemas


@cache
def _k8s_dir() -> Path:
    import kubernetes_validate

    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"


@cache
def _registry() -> Registry:
    """Kubernetes' strict schemas (unknown fields are errors) under their https://kubernetes.io ids."""
    resources = []
    for name in ("_definitions.json", "podtemplatespec-v1.json", "service-v1.json"):
        resources.append(Resource.from_contents(json.loads((_k8s_dir() / name).read_text())))
    resources.append(Resource.from_contents(yaml.safe_load(KUBERAY_SCHEMA.read_text())))
    return Registry().with_resources((r.id(), r) for r in resources)


def _errors(schema: dict[str, Any], doc: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def k8s_errors(doc: dict[str, Any]) -> list[str]:
    """Return where `doc`, a core Kubernetes object, breaks Kubernetes' own schema of its kind."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])  # networking.k8s.io/v1 → networking-v1
    return _errors(json.loads((_k8s_dir() / f"{doc['kind'].lower()}-{group_version}.json").read_text()), doc)


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    return _errors({"$ref": "https://tuneloop.local/schemas/kuberay-v1"}, doc)


def test_the_schemas_catch_mistakes() -> None:
    job = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "x"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    assert k8s_errors(job) == []
    assert k8s_errors({**job, "spec": {**job["spec"], "acessModes": ["ReadWriteMany"]}})  # a typo
    service = _docs(KUBERAY / "rayservice.yaml")[0]
    assert kuberay_errors(service) == []
    bad = yaml.safe_load(yaml.safe_dump(service))
    bad["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "password"
    assert any("authOptions/mode" in e for e in kuberay_errors(bad))
    bad = yaml.safe_load(yaml.safe_dump(service))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert any("containers/0/imagePullPolicy" in e for e in kuberay_errors(bad))  # Kubernetes' own pod schema
    bad = yaml.safe_load(yaml.safe_dump(service))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    assert kuberay_errors(bad)


# --------------------------------------------------------------------------- KubeRay


def _ray_clusters() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            spec = doc.get("spec", {})
            cluster = {
                "RayService": spec.get("rayClusterConfig"),
                "RayJob": spec.get("rayClusterSpec"),
                "RayCluster": spec,
            }.get(doc.get("kind"))
            if cluster is not None:
                out.append((f"{path.name}:{doc['kind']}", cluster))
    return out


def test_kuberay_resources_match_the_crds() -> None:
    checked = 0
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("apiVersion") == "ray.io/v1":
                assert kuberay_errors(doc) == [], path.name
                checked += 1
    assert checked >= 2  # the RayService and the RayJob


def test_ray_clusters_require_a_token_and_stay_inside_the_cluster() -> None:
    """ShadowRay (CVE-2023-48022): a dashboard reachable without auth runs anyone's jobs."""
    import ray

    clusters = _ray_clusters()
    assert clusters
    for name, cluster in clusters:
        assert cluster["authOptions"]["mode"] == "token", name
        assert cluster["authOptions"]["secretName"] == "tuneloop-ray-auth", name  # a Secret, not a literal
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not head.get("enableIngress"), name
        # The image's Ray: clients, head and workers must run one version.
        assert cluster["rayVersion"] == ray.__version__ == _constraint("ray"), name
        for container in _containers(cluster):
            names = {e["name"] for e in container.get("env", [])}
            assert "RAY_AUTH_TOKEN" not in names or all(  # a token only ever comes from a Secret
                "valueFrom" in e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN"
            ), name


def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_core_kubernetes_objects_match_kubernetes_schemas() -> None:
    checked = 0
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("apiVersion") != "ray.io/v1" and doc.get("kind") != "Kustomization":
                assert k8s_errors(doc) == [], f"{path.name}: {doc['kind']}"
                checked += 1
    assert checked >= 2  # the volume claim and the network policy


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        assert (KUBERAY / resource).is_file(), resource
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"].split(":")[0] for _, cluster in _ray_clusters() for c in _containers(cluster)}
    assert used <= images  # the one place to set the registry covers every container


def test_rayjob_trains_with_ray_train_through_an_existing_entry_point() -> None:
    job = next(d for d in _docs(KUBERAY / "rayjob-finetune.yaml") if d["kind"] == "RayJob")
    argv = job["spec"]["entrypoint"].split()
    assert argv[:3] == ["python", "-m", "tasks.finetune_ray"]
    from tasks.finetune_ray import arguments

    args = arguments().parse_args(argv[3:])  # every flag is one the launcher takes (else SystemExit)
    assert args.num_workers >= 1 and args.out
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(REPO_ROOT / argv[argv.index("--config") + 1], overrides)  # the config and overrides load
    assert cfg.train.deepspeed == "zero3"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == int(argv[argv.index("--num-workers") + 1])  # one worker pod per Ray Train worker
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


# --------------------------------------------------------------------------- Ray Serve


def _rayservice_serve_config() -> dict[str, Any]:
    service = next(d for d in _docs(KUBERAY / "rayservice.yaml") if d["kind"] == "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_rayservice_serve_config_is_a_valid_serve_deploy_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(_rayservice_serve_config())
    assert [app.name for app in config.applications] == ["tuneloop"]
    assert config.http_options.host == "0.0.0.0"  # the pod's address; the head service is ClusterIP
    args = config.applications[0].args
    cfg = load_config(REPO_ROOT / args["config"], args.get("set", []))
    assert cfg.serve.require_api_key  # beyond loopback: keys on, from the tuneloop-env Secret


def test_a_gateway_beyond_loopback_refuses_to_start_without_keys() -> None:
    from serving.app import check_exposure

    with pytest.raises(RuntimeError, match="beyond loopback, and no API key"):
        check_exposure("0.0.0.0", require_key=False, have_keys=False)
    with pytest.raises(RuntimeError, match="beyond loopback"):
        check_exposure("unknown", require_key=False, have_keys=False)  # cannot tell: assume exposed
    with pytest.raises(RuntimeError, match="require_api_key is on"):
        check_exposure("127.0.0.1", require_key=True, have_keys=False)
    check_exposure("0.0.0.0", require_key=True, have_keys=True)
    check_exposure("127.0.0.1", require_key=False, have_keys=False)  # the laptop default: loopback, open


def test_rayservice_serves_what_tuneloop_serve_config_writes_for_its_config() -> None:
    """The applications are `serve_config` of the tuneloop config they name: one generator for
    the laptop's serve-config.yaml, the promotion flow and the cluster."""
    from tuneloop.servespec import serve_config

    apps = _rayservice_serve_config()["applications"]
    args = apps[0]["args"]
    cfg = load_config(REPO_ROOT / args["config"], args.get("set", []))
    assert apps == serve_config(cfg, args)["applications"]


# What an environment sizes and points at; everything else of an application is the same everywhere.
PER_ENVIRONMENT = {"args"}
PER_ENVIRONMENT_DEPLOYMENT = {"num_replicas", "autoscaling_config", "ray_actor_options"}


def _shape(apps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **{k: v for k, v in app.items() if k not in PER_ENVIRONMENT},
            "deployments": [
                {k: v for k, v in d.items() if k not in PER_ENVIRONMENT_DEPLOYMENT} for d in app["deployments"]
            ],
        }
        for app in apps
    ]


def test_rayservice_serves_the_same_applications_as_the_local_serve_config() -> None:
    if not SERVE_CONFIG.exists():
        pytest.skip(
            f"{SERVE_CONFIG.relative_to(REPO_ROOT)} (the local `serve deploy` config) is not in this "
            "checkout: nothing to compare the RayService's serveConfigV2 with"
        )
    from ray.serve.schema import ServeDeploySchema

    local = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(local)
    cluster = _rayservice_serve_config()
    # Same application names, routes, import paths, deployments and their user_config; only the
    # tuneloop config named in args (laptop vs team) and the sizing that follows from it differ.
    assert _shape(cluster["applications"]) == _shape(local["applications"])
    assert [a["args"]["config"] for a in local["applications"]] == ["configs/local.yaml"]


# --------------------------------------------------------------------------- Prefect


def _pools() -> list[dict[str, Any]]:
    return yaml.safe_load((INFRA / "prefect" / "work-pools.yaml").read_text())["pools"]


@cache
def _default_templates() -> dict[str, dict[str, Any]]:
    """Prefect's default base job template of each worker type, as the server ships them."""
    import prefect.server.api

    views = Path(prefect.server.api.__file__).parent / "collections_data" / "views"
    metadata = json.loads((views / "aggregate-worker-metadata.json").read_text())
    return {
        worker["type"]: worker["default_base_job_configuration"]
        for collection in metadata.values()
        for worker in collection.values()
    }


def test_prefect_yaml_is_a_valid_project_file() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    from flows.deployments import CONFIG_VARIABLE, CRON_VARIABLE

    project = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    pools = {p["name"] for p in _pools()}
    names = set()
    for deployment in project.deployments:
        path, function = deployment.entrypoint.split(":")
        tree = ast.parse((REPO_ROOT / path).read_text())
        flow = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
        decorator = next(d for d in flow.decorator_list if isinstance(d, ast.Call) and d.func.id == "flow")
        flow_name = next(k.value.value for k in decorator.keywords if k.arg == "name")
        names.add(f"{flow_name}/{deployment.name}")
        assert deployment.work_pool.name in pools, deployment.name
        assert deployment.parameters == {"config": f"{{{{ prefect.variables.{CONFIG_VARIABLE} }}}}"}
    for deployment in project.deployments:
        for schedule in deployment.schedules or []:
            assert schedule.cron == f"{{{{ prefect.variables.{CRON_VARIABLE} }}}}"
    # The deployments the configs start retraining through exist.
    for config in ("local.yaml", "team.yaml"):
        assert load_config(REPO_ROOT / "configs" / config).prefect.training_deployment in names, config
    assert {"promotion-flow/tuneloop-promotion", "monitoring-flow/tuneloop-monitoring"} <= names
    # The code comes from the worker's checkout or image, read when a run starts.
    assert project.pull == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $TUNELOOP_REPO_DIR }}"}}
    ]


@pytest.mark.parametrize("config", ["local.yaml", "team.yaml"])
def test_shipped_configs_fit_the_deployment_parameter_variable(config: str) -> None:
    from prefect.types import MAX_VARIABLE_VALUE_LENGTH

    from flows.deployments import deployment_config
    from tuneloop.config import TuneloopConfig

    cfg = load_config(REPO_ROOT / "configs" / config)
    params = deployment_config(cfg)
    assert "home" not in params  # each worker's own TUNELOOP_HOME
    assert TuneloopConfig.model_validate({**params, "home": str(cfg.home)}) == cfg  # nothing lost
    # Room to grow: the whole Prefect variable may hold MAX_VARIABLE_VALUE_LENGTH characters.
    assert len(json.dumps(params)) < MAX_VARIABLE_VALUE_LENGTH / 2


def test_work_pool_templates_are_valid_and_keep_prefects_defaults() -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    for pool in _pools():
        template = json.loads((INFRA / "prefect" / pool["base_job_template"]).read_text())
        WorkPoolCreate(name=pool["name"], type=pool["type"], base_job_template=template)  # placeholders declared
        jsonschema.Draft7Validator.check_schema(template["variables"])
        default = _default_templates()[pool["type"]]
        # Every variable and job setting the worker type knows is still there.
        assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"]), pool["name"]
        assert set(default["job_configuration"]) <= set(template["job_configuration"]), pool["name"]
        for name, prop in template["variables"]["properties"].items():
            if "default" in prop:  # defaults fit their own variable's schema
                definitions = template["variables"].get("definitions", {})
                assert not list(
                    jsonschema.Draft7Validator({**prop, "definitions": definitions}).iter_errors(prop["default"])
                ), f"{pool['name']}: default of {name}"


def test_gpu_pool_renders_a_valid_kubernetes_job_that_asks_for_a_gpu() -> None:
    from prefect.utilities.templating import apply_values

    pool = next(p for p in _pools() if p["type"] == "kubernetes")
    template = json.loads((INFRA / "prefect" / pool["base_job_template"]).read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    # What the worker fills in itself when it submits a flow run.
    values |= {
        "name": "tuneloop-training-abc",
        "command": "prefect flow-run execute",
        "labels": {"a": "b"},
        "env": {**values["env"], "PREFECT__FLOW_RUN_ID": "1"},
    }
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in values["env"].items()]  # the worker's dict → list
    container["args"] = container["args"].split()
    assert k8s_errors(job) == []
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "TUNELOOP_REPO_DIR", "value": "/opt/tuneloop"} in container["env"]  # prefect.yaml's pull step


# --------------------------------------------------------------------------- MLflow compose


def test_mlflow_compose_file() -> None:
    compose = yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow"}
    for name, service in services.items():
        if service.get("restart") != "no":  # long-running: compose knows when each is ready
            assert "healthcheck" in service, name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert not services["postgres"].get("ports") and not services["minio"].get("ports")
    # The team's collections: pgvector in the image, its database made on first start (tests/test_retrieval.py
    # runs that script on a real PostgreSQL with pgvector).
    assert services["postgres"]["image"].startswith("pgvector/pgvector:pg")
    assert "CREATE EXTENSION IF NOT EXISTS vector" in (INFRA / "mlflow" / "initdb" / "20-collections.sql").read_text()
    mlflow = services["mlflow"]
    assert mlflow["build"]["dockerfile"] == "mlflow/Dockerfile"
    assert (INFRA / "mlflow" / mlflow["build"]["context"] / "mlflow" / "Dockerfile").is_file()
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    # Secrets come from the env file, and compose stops when one is missing.
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", env[key]), key
    entrypoint = (REPO_ROOT / "mlflow" / "entrypoint.sh").read_text()
    assert "--app-name basic-auth" in entrypoint and "--allowed-hosts" in entrypoint
    assert "python -m tuneloop.mlflow_auth" in entrypoint


def test_mlflow_env_example_names_every_variable_and_holds_no_secret() -> None:
    text = (INFRA / "mlflow" / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text)) - {"MINIO_IMAGE", "MINIO_MC_IMAGE"}
    example = dict(
        line.split("=", 1)
        for line in (INFRA / "mlflow" / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert used <= set(example), used - set(example)
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET", key):
            assert value == "", f"{key} has a value in the example"
    assert "infra/mlflow/.env" in (REPO_ROOT / ".gitignore").read_text().splitlines()


# --------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_zero_sections_match_deepspeeds_model() -> None:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for path in sorted((INFRA / "deepspeed").glob("*.json")):
        zero = json.loads(path.read_text())["zero_optimization"]
        # "auto" is the HF Trainer's to fill in from train.* before DeepSpeed reads it.
        assert DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if v != "auto"}).stage == zero["stage"]


# --------------------------------------------------------------------------- every file


CHECKED: dict[str, Callable[[], None]] = {
    "kuberay/*.yaml": test_kuberay_resources_match_the_crds,
    "prefect/*.json": test_work_pool_templates_are_valid_and_keep_prefects_defaults,
    "prefect/work-pools.yaml": test_work_pool_templates_are_valid_and_keep_prefects_defaults,
    "mlflow/compose.yaml": test_mlflow_compose_file,
    "deepspeed/*.json": test_deepspeed_zero_sections_match_deepspeeds_model,
    "serve/*.yaml": test_rayservice_serves_the_same_applications_as_the_local_serve_config,
}


def test_every_yaml_and_json_file_in_infra_has_a_check() -> None:
    files = [p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}]
    assert files
    for path in files:
        relative = path.relative_to(INFRA)
        assert any(relative.match(pattern) for pattern in CHECKED), f"infra/{relative} is checked by no test"
        _docs(path) if path.suffix != ".json" else json.loads(path.read_text())  # parses
