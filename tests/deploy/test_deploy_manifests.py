"""deploy/: every manifest is a valid Kubernetes object (OpenAPI schemas of kubernetes-validate), and each
number or name it shares with the code (ports, probe paths, metric, API-key variable, drain, budgets) agrees."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service import metrics
from service.middleware import UNLIMITED_PATHS, GuardMiddleware
from service.settings import ENV_PREFIX, ServiceSettings, parse_cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# The oldest Kubernetes minor still commonly run, and the newest the package ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# Custom resources: their CRDs are not in the Kubernetes schemas; the tests below check the fields we use.
CRD_KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("ray.io/v1", "RayCluster"),  # tests/deploy/test_deploy_platform.py checks it
}
EXAMPLES = {DEPLOY / "base" / "secret.example.yaml"}  # shown in docs, never applied by a kustomization
MIB = 1024 * 1024


# -- loading and rendering ------------------------------------------------------------------------------

def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def _kustomizations() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


def _listed(kustomization: Path) -> list[Path]:
    """Files a kustomization names (resources that are files, and patches); directories are overlays' bases."""
    spec = _docs(kustomization)[0]
    paths = [kustomization.parent / entry for entry in spec.get("resources", [])]
    paths += [kustomization.parent / patch["path"] for patch in spec.get("patches", [])]
    return [path.resolve() for path in paths]


def _resource_files() -> list[Path]:
    files = {path for k in _kustomizations() for path in _listed(k) if path.suffix == ".yaml"}
    patches = {kustomization.parent.resolve() / p["path"]
               for kustomization in _kustomizations() for p in _docs(kustomization)[0].get("patches", [])}
    return sorted((files - patches) | {path.resolve() for path in EXAMPLES})


def _objects() -> list[tuple[str, dict[str, Any]]]:
    return [(str(path.relative_to(DEPLOY)), doc) for path in _resource_files() for doc in _docs(path)]


def _one(kind: str, folder: str = "base") -> dict[str, Any]:
    found = [doc for path in _resource_files() if path.is_relative_to(DEPLOY / folder)
             for doc in _docs(path) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under deploy/{folder}, found {len(found)}"
    return found[0]


def _merge(base: Any, patch: Any) -> Any:
    """Kustomize's strategic merge for what our patches use: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    named = (isinstance(base, list) and isinstance(patch, list)
             and all(isinstance(item, dict) and "name" in item for item in base + patch))
    if named:
        out = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _gpu_deployment() -> dict[str, Any]:
    overlay = DEPLOY / "overlays" / "gpu"
    patch_paths = [overlay / p["path"] for p in _docs(overlay / "kustomization.yaml")[0]["patches"]]
    rendered = _one("Deployment")
    for path in patch_paths:
        patch = _docs(path)[0]
        assert (patch["kind"], patch["metadata"]["name"]) == (rendered["kind"], rendered["metadata"]["name"]), \
            f"{path.name} patches {patch['kind']}/{patch['metadata']['name']}, not the base Deployment"
        rendered = _merge(rendered, patch)
    return rendered


def _deployments() -> dict[str, dict[str, Any]]:
    return {"base": _one("Deployment"), "gpu": _gpu_deployment()}


def _container(pod_spec: dict[str, Any], name: str = "medrefine") -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def _settings(container: dict[str, Any], secret: dict[str, Any]) -> ServiceSettings:
    """The settings the server builds from this container's environment (the Secret's value filled in)."""
    environ = {}
    for item in container.get("env", []):
        if "value" in item:
            environ[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], f"{item['name']}: Secret {ref['name']!r} is not deployed"
            environ[item["name"]] = secret["stringData"][ref["key"]]
    return ServiceSettings.from_env(environ)


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity in base units (bytes, cores): "3Gi", "1536Mi", "500m", "2"."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and (match[2] in units or match[2] == ""), f"unparsed quantity {value!r}"
    return float(match[1]) * units.get(match[2], 1)


def _makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"Makefile: no {name} ?= ..."
    return match[1]


def _dockerfile_cmd() -> list[str]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)[1])
    assert cmd[:3] == ["python", "-m", "service"], cmd
    return cmd[3:]


def _selected(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


# -- the manifests are valid objects --------------------------------------------------------------------

def test_every_manifest_is_applied_by_a_kustomization_or_is_an_example():
    for kustomization in _kustomizations():
        for path in _listed(kustomization):
            assert path.exists(), f"{kustomization.relative_to(ROOT)} lists {path}, which does not exist"
    listed = {path for k in _kustomizations() for path in _listed(k)} | {p.resolve() for p in EXAMPLES}
    stray = [p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in listed
             and "container" not in p.relative_to(DEPLOY).parts]
    assert not stray, f"manifests no kustomization applies: {stray}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_validate_against_the_openapi_schemas(version):
    objects = [(name, doc) for name, doc in _objects() if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS]
    objects.append(("overlays/gpu (rendered)", _gpu_deployment()))
    # The KServe runtime's containers and volumes are core/v1 types: validate them inside a Pod.
    runtime = _one("ServingRuntime", "kserve")
    objects.append(("kserve/servingruntime.yaml (pod)", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "medrefine-runtime"},
        "spec": {"containers": runtime["spec"]["containers"], "volumes": runtime["spec"]["volumes"]}}))
    kinds = {doc["kind"] for _, doc in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "HorizontalPodAutoscaler",
            "Secret", "ConfigMap", "Pod"} <= kinds
    for name, doc in objects:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata'].get('name')} invalid for Kubernetes {version}: "
                        f"{error.message}")


def test_strict_validation_rejects_a_misspelt_field():
    deployment = copy.deepcopy(_one("Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# -- cross-references with the code ---------------------------------------------------------------------

def test_container_ports_match_the_settings_makefile_and_image_command():
    defaults = ServiceSettings()
    image = parse_cli(_dockerfile_cmd())
    expected = {"http": defaults.port, "grpc": defaults.grpc_port}
    assert expected == {"http": int(_makefile_var("PORT")), "grpc": int(_makefile_var("GRPC_PORT"))}
    assert expected == {"http": image.port, "grpc": image.grpc_port}
    for variant, deployment in _deployments().items():
        ports = {p["name"]: p["containerPort"] for p in _container(deployment["spec"]["template"]["spec"])["ports"]}
        assert ports == expected, f"{variant} Deployment container ports {ports}, the server listens on {expected}"
    services = {doc["metadata"]["name"]: doc for _, doc in _objects() if doc["kind"] == "Service"}
    assert {(p["targetPort"], p["port"]) for s in services.values() for p in s["spec"]["ports"]} == \
        {("http", expected["http"]), ("grpc", expected["grpc"])}
    runtime_ports = _container(_one("ServingRuntime", "kserve")["spec"], "kserve-container")["ports"]
    assert [p["containerPort"] for p in runtime_ports] == [expected["http"]]


def _guard_answer(path: str) -> tuple[int, dict[str, Any], bool]:
    """(status, JSON body, reached the app) of GET ``path`` through the real guard of a starting server."""
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent: list[dict[str, Any]] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    guard = GuardMiddleware(app, runtime=lambda: None, settings=ServiceSettings)
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    asyncio.run(guard(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), bool(reached)


def test_probe_paths_are_answered_by_the_guard():
    for variant, deployment in _deployments().items():
        container = _container(deployment["spec"]["template"]["spec"])
        probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert {kind: p["port"] for kind, p in probes.items()} == dict.fromkeys(probes, "http"), variant
        assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/livez", variant
        assert probes["readinessProbe"]["path"] == "/readyz", variant
    runtime = _container(_one("ServingRuntime", "kserve")["spec"], "kserve-container")
    assert (runtime["livenessProbe"]["httpGet"]["path"], runtime["readinessProbe"]["httpGet"]["path"]) == \
        ("/livez", "/readyz")
    # What the kubelet sees while the server starts: live (no restart loop), not ready (no traffic).
    assert _guard_answer("/livez") == (200, {"live": True}, False)
    status, body, reached = _guard_answer("/readyz")
    assert (status, body["ready"], reached) == (503, False, False)


def test_hpa_scales_on_a_gauge_the_service_exports_and_prometheus_scrapes():
    hpa = _one("HorizontalPodAutoscaler")
    deployment = _one("Deployment")
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) == \
        ("Deployment", deployment["metadata"]["name"])
    exported = {m.name: m.type for m in metrics.REGISTRY.collect()}
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names, "the HPA has no per-pod custom metric"
    for name in names:
        assert exported.get(name) == "gauge", f"HPA metric {name!r}: service/metrics.py exports {exported}"
    # prometheus-adapter publishes exactly that name from the scraped series of the same name.
    rules = yaml.safe_load(_one("ConfigMap", "autoscaling")["data"]["config.yaml"])["rules"]
    published = {rule["name"]["as"]: rule for rule in rules}
    for name in names:
        rule = published[name]
        assert rule["seriesQuery"].startswith(name + "{"), rule["seriesQuery"]
        assert re.fullmatch(rule["name"]["matches"], name)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # Prometheus scrapes the pods' /metrics, which needs no API key and is never refused for load.
    monitor = _one("PodMonitor", "autoscaling")
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("http", "/metrics")]
    assert "/metrics" in UNLIMITED_PATHS
    target = max(_quantity(m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"])
    settings = _settings(_container(deployment["spec"]["template"]["spec"]), _one("Secret"))
    assert 0 < target < settings.max_concurrency, "the HPA target must be reachable before requests are refused"


def test_selectors_pick_the_server_pods():
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selected(deployment["spec"]["selector"]["matchLabels"], labels)
    selectors = {
        "Service " + doc["metadata"]["name"]: doc["spec"]["selector"]
        for _, doc in _objects() if doc["kind"] == "Service"
    }
    selectors["PodDisruptionBudget"] = _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    selectors["NetworkPolicy"] = _one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    selectors["PodMonitor"] = _one("PodMonitor", "autoscaling")["spec"]["selector"]["matchLabels"]
    for owner, selector in selectors.items():
        assert _selected(selector, labels), f"{owner} selects {selector}, the pods carry {labels}"
    # The NetworkPolicy opens exactly the container's named ports.
    ports = {p["name"] for p in _container(deployment["spec"]["template"]["spec"])["ports"]}
    opened = {p["port"] for rule in _one("NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
    assert opened == ports


def test_api_key_comes_from_the_secret_under_the_variable_the_server_reads():
    secret = _one("Secret")
    containers = {variant: _container(d["spec"]["template"]["spec"]) for variant, d in _deployments().items()}
    containers["kserve"] = _container(_one("ServingRuntime", "kserve")["spec"], "kserve-container")
    known = {ENV_PREFIX + f.name.upper() for f in fields(ServiceSettings) if f.name != "api_key"}
    for variant, container in containers.items():
        settings = _settings(container, secret)
        env = _env(container)
        unknown = {name for name in env if name not in known and name != settings.api_key_env}
        assert not unknown, f"{variant}: {unknown} are not read by service/settings.py (typo?)"
        assert settings.api_key_env == ServiceSettings.api_key_env == "MEDREFINE_API_KEY"
        assert "secretKeyRef" in env[settings.api_key_env], f"{variant}: the API key must come from a Secret"
        assert settings.require_api_key and settings.api_key == secret["stringData"][settings.api_key_env]


def test_drain_finishes_inside_the_grace_period():
    for variant, deployment in _deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        container = _container(pod)
        settings = _settings(container, _one("Secret"))
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        pre_stop_s = float(command[1])
        grace_s = pod["terminationGracePeriodSeconds"]
        assert settings.drain_timeout_s < grace_s - pre_stop_s, \
            f"{variant}: drain {settings.drain_timeout_s} s + preStop {pre_stop_s} s exceed the grace {grace_s} s"
        # BentoML's supervisor kills its worker 30 s after SIGTERM (service/settings.py).
        assert settings.drain_timeout_s < 30
        # A PID 1 that is not an init (the pause container) ignores SIGTERM: the drain would never start.
        assert pod["shareProcessNamespace"] is True


def test_pods_run_non_root_on_a_read_only_root_with_a_writable_tmp():
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text(encoding="utf-8"))[1])
    runtime = _one("ServingRuntime", "kserve")["spec"]
    pods = {variant: d["spec"]["template"]["spec"] for variant, d in _deployments().items()}
    pods["kserve"] = runtime
    for variant, pod in pods.items():
        container = pod["containers"][0]
        context = {**pod.get("securityContext", {}), **container["securityContext"]}
        assert context["runAsNonRoot"] is True and context["runAsUser"] == uid, variant
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, variant
        assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"], variant
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
        assert "emptyDir" in volume, f"{variant}: /tmp must be an emptyDir"


def test_memory_limit_covers_the_measured_footprint_plus_every_documented_bound():
    soak = json.loads((ROOT / "loadtest" / "results" / "soak-10min.json").read_text(encoding="utf-8"))
    measured_rss = max(sample["rss_bytes"] for sample in soak["rss"])  # supervisor + worker, default models
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(pod)
    settings = _settings(container, _one("Secret"))
    resources = container["resources"]
    # Per request in progress (HTTP and gRPC each up to max_concurrency): its upload and its decoded
    # float32 image; per image in a running batch a few (we budget 4) full-size float32 maps.
    per_request = settings.max_upload_bytes + 4 * settings.max_pixels
    bound = (measured_rss + settings.embedding_cache_bytes + 2 * settings.max_concurrency * per_request
             + settings.max_batch_size * 4 * 4 * settings.max_pixels)
    limit = _quantity(resources["limits"]["memory"])
    assert limit >= bound, f"memory limit {limit / MIB:.0f} MiB < budget {bound / MIB:.0f} MiB"
    assert _quantity(resources["requests"]["memory"]) >= measured_rss + settings.embedding_cache_bytes
    assert _quantity(resources["requests"]["cpu"]) >= max(1, settings.intra_op_threads)
    # Uploads are spooled to /tmp while parsed (BentoML), beside the prometheus multiprocess files.
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")["emptyDir"]
    assert _quantity(tmp["sizeLimit"]) >= settings.max_concurrency * settings.max_upload_bytes + 64 * MIB
    assert _quantity(resources["limits"]["ephemeral-storage"]) >= _quantity(tmp["sizeLimit"])


def test_gpu_variant_requests_one_nvidia_gpu_and_runs_on_cuda():
    deployment = _gpu_deployment()
    container = _container(deployment["spec"]["template"]["spec"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _settings(container, _one("Secret")).device == "cuda"
    base_limit = _quantity(_container(_one("Deployment")["spec"]["template"]["spec"])["resources"]["limits"]["memory"])
    assert _quantity(container["resources"]["limits"]["memory"]) >= base_limit


def test_kserve_inference_service_uses_the_v2_protocol_on_the_medrefine_runtime():
    service = _one("InferenceService", "kserve")
    runtime = _one("ServingRuntime", "kserve")
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    container = _container(runtime["spec"], "kserve-container")
    settings = _settings(container, _one("Secret"))
    assert settings.grpc_port == 0, "KServe routes one port: gRPC stays off in the runtime"
    annotations = runtime["spec"]["annotations"]
    assert (int(annotations["prometheus.kserve.io/port"]), annotations["prometheus.kserve.io/path"]) == \
        (settings.port, "/metrics")
