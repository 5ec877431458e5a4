"""deploy/platform: the worker Deployment, the server's platform patch and the KubeRay RayCluster, validated
against the Kubernetes schemas and cross-checked with medplatform's CLI, the variables the code reads and
the server Deployment."""

from __future__ import annotations

import copy
import re
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from medplatform import cli
from service.settings import ENV_PREFIX, ServiceSettings
from tests.deploy import test_deploy_manifests as manifests

ROOT = manifests.ROOT
PLATFORM = manifests.DEPLOY / "platform"
VARIANTS = {"workers": PLATFORM, "ray": PLATFORM / "ray"}
RAY = ("ray.io/v1", "RayCluster")
MIB = 1024 * 1024


# -- rendering: kustomize's resources and strategic-merge patches, as our kustomizations use them -----------

def _render(folder: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k folder`` creates: resources (folders recursively), then patches by kind/name."""
    spec = manifests._docs(folder / "kustomization.yaml")[0]
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        objects += _render(path) if path.is_dir() else [copy.deepcopy(d) for d in manifests._docs(path)]
    for entry in spec.get("patches", []):
        patch = manifests._docs(folder / entry["path"])[0]
        key = (patch["kind"], patch["metadata"]["name"])
        targets = [i for i, o in enumerate(objects) if (o["kind"], o["metadata"]["name"]) == key]
        assert len(targets) == 1, f"{folder / entry['path']} patches {key}, which the resources hold {len(targets)}x"
        objects[targets[0]] = manifests._merge(objects[targets[0]], patch)
    return objects


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (kind, name)]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _raycluster() -> dict[str, Any]:
    return _find(_render(VARIANTS["ray"]), "RayCluster", "medrefine-ray")


def _ray_pods(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod templates of the RayCluster: ``head`` and each worker group by its name."""
    pods = {"head": cluster["spec"]["headGroupSpec"]["template"]}
    pods |= {group["groupName"]: group["template"] for group in cluster["spec"]["workerGroupSpecs"]}
    return pods


def _platform_pods(variant: str) -> dict[str, dict[str, Any]]:
    """Every pod template the variant runs: the server, the worker and (ray) the Ray pods."""
    objects = _render(VARIANTS[variant])
    pods = {"server": _find(objects, "Deployment", "medrefine")["spec"]["template"],
            "worker": _find(objects, "Deployment", "medrefine-worker")["spec"]["template"]}
    if variant == "ray":
        pods |= {f"ray-{name}": pod for name, pod in _ray_pods(_raycluster()).items()}
    return pods


def _variables(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The container's environment: ConfigMap keys (envFrom) and then ``env`` (value or valueFrom)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        env |= _find(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
    return env | manifests._env(container)


def _code_variables() -> set[str]:
    """Every MEDREFINE_* name the code reads: ServiceSettings fields, and the names in medplatform/ and training/."""
    names = {ENV_PREFIX + f.name.upper() for f in fields(ServiceSettings) if f.name != "api_key"}
    for package in ("medplatform", "training", "service"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"\bMEDREFINE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")))
    return names


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and In/NotIn/Exists matchExpressions) against a pod's labels."""
    if not selector:
        return True
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        ok &= {"In": value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
               "Exists": value is not None, "DoesNotExist": value is None}[op]
    return ok


# -- the objects are valid ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", manifests.K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_validate_against_the_openapi_schemas(variant, version):
    objects = _render(VARIANTS[variant])
    checked = [o for o in objects if (o["apiVersion"], o["kind"]) != RAY]
    # KubeRay's CRD is not in the Kubernetes schemas; its pod templates are core/v1 PodTemplateSpecs.
    for o in objects:
        if (o["apiVersion"], o["kind"]) == RAY:
            for name, template in _ray_pods(o).items():
                checked.append({"apiVersion": "v1", "kind": "Pod",
                                "metadata": {"name": f"ray-{name}", **template.get("metadata", {})},
                                "spec": template["spec"]})
    kinds = [o["kind"] for o in checked]
    assert kinds.count("Deployment") == 2 and "ConfigMap" in kinds and "NetworkPolicy" in kinds, kinds
    assert ("Pod" in kinds) == (variant == "ray")
    for o in checked:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{variant}: {o['kind']} {o['metadata']['name']} invalid for Kubernetes {version}: "
                        f"{error.message}")


def test_raycluster_carries_the_fields_kuberay_needs():
    cluster = _raycluster()
    spec = cluster["spec"]
    assert (cluster["apiVersion"], cluster["kind"]) == RAY
    assert set(spec) <= {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling"}, set(spec)
    # The cluster's Ray is the one the project declares (pyproject.toml's ray[default] range).
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'"ray\[default\]([^"]+)"', pyproject)[1]
    assert spec["rayVersion"] in SpecifierSet(declared), f"rayVersion {spec['rayVersion']} outside {declared}"
    head = spec["headGroupSpec"]
    # KubeRay's CRD types rayStartParams as map[string]string: a bare number or boolean is refused.
    for group in [head, *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        assert group["template"]["spec"]["containers"], "a group without containers"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", "the Jobs API must answer other pods"
    assert head["serviceType"] == "ClusterIP"
    # KubeRay treats the first container as the Ray container.
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379, ports
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) == len(spec["workerGroupSpecs"]) and {"cpu", "gpu"} <= set(groups)
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        resources = group["template"]["spec"]["containers"][0]["resources"]
        gpus = {part: resources[part].get("nvidia.com/gpu") for part in ("requests", "limits")}
        if name == "gpu":
            # Extended resources must be requested equal to their limit.
            assert gpus["requests"] == gpus["limits"] == 1, gpus
        else:
            assert gpus == {"requests": None, "limits": None}, f"{name} asks for a GPU"


# -- cross-references with the code -------------------------------------------------------------------------

def test_worker_runs_a_real_medplatform_subcommand():
    for variant in VARIANTS:
        container = manifests._container(_platform_pods(variant)["worker"]["spec"], "worker")
        command = container["command"]
        assert command[:3] == ["python", "-m", "medplatform"], command
        args = cli._parser().parse_args(command[3:])
        assert (args.command, args.concurrency, args.max_jobs) == ("worker", 1, None), args


def test_every_medrefine_variable_is_one_the_code_reads():
    known = _code_variables()
    assert {"MEDREFINE_DB_URL", "MEDREFINE_S3_BUCKET", "MEDREFINE_JOB_STALE_S", "MEDREFINE_CACHE_DIR"} <= known
    for variant in VARIANTS:
        objects = _render(VARIANTS[variant])
        for owner, pod in _platform_pods(variant).items():
            for container in pod["spec"]["containers"]:
                env = _variables(container, objects)
                unknown = {n for n in env if n.startswith(ENV_PREFIX) and n not in known}
                assert not unknown, f"{variant}/{owner}: {sorted(unknown)} are read nowhere in the code (typo?)"


def test_server_runs_no_training_and_reads_the_admin_key_from_a_secret():
    for variant in VARIANTS:
        objects = _render(VARIANTS[variant])
        container = manifests._container(_find(objects, "Deployment", "medrefine")["spec"]["template"]["spec"])
        env = _variables(container, objects)
        assert "secretKeyRef" in env.get("MEDREFINE_ADMIN_KEY", {}), f"{variant}: the admin key must come from a Secret"
        # What the server builds from this environment, the Secrets' values filled in.
        filled = {name: (f"secret-value-of-{name.lower()}" if isinstance(value, dict) else value)
                  for name, value in env.items()}
        settings = ServiceSettings.from_env(filled)
        assert settings.platform_workers == 0, f"{variant}: training must not run in the serving pod"
        assert bool(settings.ray_address) == (variant == "ray"), variant
        # Uploaded datasets are staged on /tmp: the archive and its entries, beside the request spool.
        tmp = next(v for v in _find(objects, "Deployment", "medrefine")["spec"]["template"]["spec"]["volumes"]
                   if v["name"] == "tmp")
        staged = 2 * int(env["MEDREFINE_DATASET_MAX_BYTES"]) + settings.max_concurrency * settings.max_upload_bytes
        assert staged + 256 * MIB <= manifests._quantity(tmp["emptyDir"]["sizeLimit"]), f"{variant}: /tmp too small"
        assert manifests._quantity(container["resources"]["limits"]["ephemeral-storage"]) >= \
            manifests._quantity(tmp["emptyDir"]["sizeLimit"])


def test_ray_address_is_the_head_service_dashboard_the_server_may_reach():
    objects = _render(VARIANTS["ray"])
    cluster = _raycluster()
    server = _find(objects, "Deployment", "medrefine")["spec"]["template"]
    url = urlsplit(_variables(manifests._container(server["spec"]), objects)["MEDREFINE_RAY_ADDRESS"])
    # KubeRay names the head Service `<cluster>-head-svc` and exposes the head container's named ports on it.
    head = cluster["spec"]["headGroupSpec"]["template"]
    dashboard = next(p for p in head["spec"]["containers"][0]["ports"] if p["name"] == "dashboard")
    assert url.scheme == "http" and url.hostname.split(".")[0] == f"{cluster['metadata']['name']}-head-svc", url
    assert url.port == dashboard["containerPort"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    # Out of the server: some policy selecting the server opens that port towards the head's pods.
    egress = [rule for p in policies if _selects(p["spec"]["podSelector"], server["metadata"]["labels"])
              for rule in p["spec"].get("egress", [])]
    assert any(any(port["port"] == url.port for port in rule.get("ports", []))
               and any(_selects(peer.get("podSelector", {}), head["metadata"]["labels"]) for peer in rule["to"])
               for rule in egress if "to" in rule), "no egress from the server to the Ray dashboard"
    # Into the head: the server's pods on that port.
    ingress = [rule for p in policies if _selects(p["spec"]["podSelector"], head["metadata"]["labels"])
               for rule in p["spec"].get("ingress", [])]
    assert any(any(_selects(peer.get("podSelector", {}), server["metadata"]["labels"]) for peer in rule["from"])
               and any(port["port"] == url.port for port in rule.get("ports", [])) for rule in ingress), \
        "no ingress from the server to the Ray dashboard"


def test_workers_reach_the_database_and_s3_from_the_secret_and_configmap():
    for variant in VARIANTS:
        objects = _render(VARIANTS[variant])
        policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
        for owner, pod in _platform_pods(variant).items():
            env = _variables(pod["spec"]["containers"][0], objects)
            for name in ("MEDREFINE_DB_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[name]["secretKeyRef"]
                assert (ref["name"], ref["key"]) == ("medrefine-platform", name), f"{variant}/{owner}: {name}"
            assert env["MEDREFINE_S3_BUCKET"], f"{variant}/{owner}: no bucket"
            # PostgreSQL and S3 (HTTPS) are open for egress from every pod that needs them.
            opened = {port["port"] for p in policies if _selects(p["spec"]["podSelector"], pod["metadata"]["labels"])
                      and "Egress" in p["spec"]["policyTypes"] for rule in p["spec"].get("egress", [])
                      for port in rule.get("ports", [])}
            assert {53, 5432, 443} <= opened, f"{variant}/{owner}: egress opens only {opened}"
        config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "medrefine-platform")
        assert not {"MEDREFINE_DB_URL", "AWS_SECRET_ACCESS_KEY"} & set(config["data"]), "credentials in a ConfigMap"


def test_platform_pods_use_the_server_image_and_security_rules():
    server = manifests._one("Deployment")["spec"]["template"]["spec"]
    server_container = manifests._container(server)
    cuda_image = manifests._container(manifests._gpu_deployment()["spec"]["template"]["spec"])["image"]
    for variant in VARIANTS:
        for owner, pod in _platform_pods(variant).items():
            spec = pod["spec"]
            container = spec["containers"][0]
            expected = cuda_image if owner == "ray-gpu" else server_container["image"]
            assert container["image"] == expected, f"{variant}/{owner}: image {container['image']}"
            assert spec["securityContext"] == server["securityContext"], f"{variant}/{owner}: pod securityContext"
            assert container["securityContext"] == server_container["securityContext"], f"{variant}/{owner}"
            assert spec["automountServiceAccountToken"] is False, f"{variant}/{owner}"
            tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == tmp["name"]), f"{variant}/{owner}"
            home = manifests._env(container).get("HOME", "/tmp/bentoml")
            assert owner == "server" or home.startswith("/tmp/"), f"{variant}/{owner}: HOME {home} is read-only"


def test_selectors_pick_their_own_pods_only():
    for variant in VARIANTS:
        objects = _render(VARIANTS[variant])
        pods = _platform_pods(variant)
        labels = {owner: pod["metadata"]["labels"] for owner, pod in pods.items()}
        for name, owner in (("medrefine", "server"), ("medrefine-worker", "worker")):
            selector = _find(objects, "Deployment", name)["spec"]["selector"]
            picked = {o for o, lab in labels.items() if _selects(selector, lab)}
            assert picked == {owner}, f"{variant}: Deployment {name} selects the pods of {picked}"
        # The server's Services, PDB and HPA target never reach a worker or a Ray pod.
        for o in objects:
            selector = {"Service": lambda s: {"matchLabels": s["selector"]},
                        "PodDisruptionBudget": lambda s: s["selector"]}.get(o["kind"])
            if selector:
                picked = {p for p, lab in labels.items() if _selects(selector(o["spec"]), lab)}
                assert picked == {"server"}, f"{variant}: {o['kind']} {o['metadata']['name']} selects {picked}"
        # Every NetworkPolicy applies to some pod of this variant.
        for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
            assert any(_selects(policy["spec"]["podSelector"], lab) for lab in labels.values()), \
                f"{variant}: NetworkPolicy {policy['metadata']['name']} selects no pod"


def test_kustomizations_list_every_platform_file():
    listed = {path for k in PLATFORM.rglob("kustomization.yaml") for path in manifests._listed(k)}
    files = {p.resolve() for p in PLATFORM.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files <= listed, f"not applied by any kustomization: {sorted(files - listed)}"
    rendered = _render(VARIANTS["workers"])
    assert not any(o["kind"] == "RayCluster" for o in rendered), "the workers variant must not need KubeRay"
    replicas = {v: _find(_render(p), "Deployment", "medrefine-worker")["spec"]["replicas"] for v, p in VARIANTS.items()}
    # With a Ray address every job is dispatched to Ray; local workers would only poll.
    assert replicas["workers"] >= 1 and replicas["ray"] == 0, replicas
    assert yaml.safe_load((PLATFORM / "kustomization.yaml").read_text(encoding="utf-8"))["resources"] == ["core"]
