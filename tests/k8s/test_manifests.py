"""The Kubernetes manifests, validated offline, each validator shown to reject a planted mistake.

- ray.io/v1 documents against KubeRay's CRD schemas (../shared/k8s/crds, or the copy of their v1
  schemas in tests/k8s/crds when the checkout has no ../shared), unknown fields rejected;
- serveConfigV2 with Ray Serve's ServeDeploySchema, its args with SemlineConfig, each autoscaling
  config with AutoscalingConfig and no unknown keys;
- core kinds (and the RayCluster pod templates, as Pods) with kubernetes-validate, strict;
- the alert rules with `promtool check rules` and `promtool test rules`.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from deployments.ops import k8s
from deployments.config import SemlineConfig

ROOT = Path(__file__).parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "k8s" / "crds"
VENDORED = Path(__file__).parent / "crds"
PROMTOOL = ROOT / ".tools" / "prometheus" / "usr" / "bin" / "promtool"
KUBERNETES_VERSION = "1.30"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _strict(schema):
    """The CRD schema as the API server applies it with strict field validation: an object
    with declared properties admits no others (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def _shared_schema(kind: str) -> dict | None:
    """The v1 schema from the workspace's KubeRay CRDs (../shared/k8s/crds), when present."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        return None
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # ~1 MB each
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _vendored_schema(kind: str) -> dict:
    """The same schema as shipped with the tests (a clean clone has no ../shared)."""
    with gzip.open(VENDORED / f"ray.io_{kind.lower()}s.v1.json.gz") as f:
        return json.load(f)["schema"]


@functools.cache
def _crd_validator(kind: str):
    return jsonschema.Draft7Validator(_strict(_shared_schema(kind) or _vendored_schema(kind)))


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_vendored_crd_schemas_are_kuberays(kind):
    shared = _shared_schema(kind)
    if shared is None:
        pytest.skip(f"no {CRDS} here to compare with (the vendored copy is used)")
    assert _vendored_schema(kind) == shared


def crd_errors(doc: dict) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1"
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _crd_validator(doc["kind"]).iter_errors(doc)]


def serve_config_errors(serve_config: dict) -> list[str]:
    """ServeDeploySchema, SemlineConfig for the args, AutoscalingConfig and its keys."""
    errors = []
    try:
        ServeDeploySchema.model_validate(serve_config)
    except Exception as exc:  # noqa: BLE001 - collected as a finding
        errors.append(f"ServeDeploySchema: {exc}")
    for app in serve_config.get("applications", []):
        try:
            SemlineConfig.model_validate(app.get("args", {}))
        except Exception as exc:  # noqa: BLE001
            errors.append(f"args: {exc}")
        for deployment in app.get("deployments", []):
            scaling = deployment.get("autoscaling_config")
            if scaling is None:
                continue
            unknown = set(scaling) - set(AutoscalingConfig.model_fields)
            if unknown:  # AutoscalingConfig itself ignores them
                errors.append(f"{deployment['name']}: unknown autoscaling keys {sorted(unknown)}")
            try:
                AutoscalingConfig(**scaling)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{deployment['name']}: {exc}")
    return errors


def core_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


def _pods(doc: dict) -> list[dict]:
    """The RayCluster pod templates of a RayService or RayJob, as Pods (for the core schema)."""
    spec = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template", **g["template"].get("metadata", {})},
             "spec": g["template"]["spec"]} for g in groups]


@pytest.fixture(scope="module")
def rayservice():
    return _docs(K8S / "rayservice.yaml")[0]


@pytest.fixture(scope="module")
def rayjob():
    return _docs(K8S / "rayjob-batch.yaml")[0]


def _promtool() -> Path:
    if not PROMTOOL.exists():
        pytest.fail(f"promtool is not at {PROMTOOL}: `make test` fetches Debian's prometheus package "
                    "(apt-get download prometheus; dpkg-deb -x)")
    return PROMTOOL


def _run_promtool(folder: Path, rule: dict, *args: str) -> subprocess.CompletedProcess:
    (folder / "semline-rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    shutil.copy(K8S / "monitoring" / "alerts-test.yaml", folder / "alerts-test.yaml")
    return subprocess.run([str(_promtool()), *args], cwd=folder, capture_output=True, text=True, timeout=60)


# --- the manifests agree with the config and validate ------------------------------------------


def test_generated_manifests_match_the_config(tmp_path):
    """`semline k8s render` of k8s/semline.yaml reproduces the checked-in files: no drift."""
    written = k8s.render(K8S / "semline.yaml", tmp_path)
    assert {p.name for p in written} == {"rayservice.yaml", "rayjob-batch.yaml", "storage.yaml"}
    for path in written:
        assert path.read_text() == (K8S / path.name).read_text(), f"run `semline k8s render`: {path.name} is stale"


def test_render_requires_api_keys_and_every_pod_reads_them_from_the_secret(rayservice, tmp_path):
    """A config without keys of its own must name the Secret that holds them (the service
    listens on the cluster's network); every pod, where any ingress replica may run, reads it."""
    config = yaml.safe_load((K8S / "semline.yaml").read_text())
    del config["kubernetes"]["api_keys_secret"]
    (tmp_path / "open.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(k8s.NoKeysError, match="api_keys_secret"):
        k8s.render(tmp_path / "open.yaml", tmp_path)
    secret = yaml.safe_load((K8S / "semline.yaml").read_text())["kubernetes"]["api_keys_secret"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["SEMLINE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "api-keys",
                                                                        "optional": False}


def test_serve_config_carries_the_local_config(rayservice):
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_config_errors(serve_config) == []
    app = serve_config["applications"][0]
    local = SemlineConfig.from_yaml(K8S / "semline.yaml")
    # The application gets exactly what `semline serve --config k8s/semline.yaml` would use.
    assert SemlineConfig.model_validate(app["args"]).model_dump(exclude={"kubernetes"}) == \
        local.model_dump(exclude={"kubernetes"})
    llm = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    assert llm["autoscaling_config"]["max_replicas"] == local.server.autoscaling.max_replicas
    assert llm["ray_actor_options"]["num_gpus"] == local.server.num_gpus == 1
    # The import path builds the application graph from those args.
    module, attr = app["import_path"].split(":")
    assert __import__(module, fromlist=[attr]).__dict__[attr](app["args"]) is not None
    # The Ray autoscaler's GPU workers follow the Serve replica bounds.
    group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 4)


def test_kuberay_documents_validate_against_the_crds(rayservice, rayjob):
    assert crd_errors(rayservice) == []
    assert crd_errors(rayjob) == []
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert "deployments.batch.job" in rayjob["spec"]["entrypoint"]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    worker = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/health"


def test_core_kinds_validate(rayservice, rayjob):
    docs = _docs(K8S / "namespace.yaml") + _docs(K8S / "storage.yaml")
    docs += _pods(rayservice) + _pods(rayjob)
    assert {d["kind"] for d in docs} == {"Namespace", "PersistentVolumeClaim", "Pod"}
    for doc in docs:
        assert core_errors(doc) == [], doc["metadata"]["name"]


def test_kustomization_lists_existing_files():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    for generator in kustomization["configMapGenerator"]:
        for file in generator["files"]:
            assert (K8S / file).is_file(), file


def test_image_matches_the_pinned_ray(rayservice, rayjob):
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = next(line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert base == k8s.RAY_IMAGE == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert f"ray[serve,data]=={ray.__version__}" in (ROOT / "pyproject.toml").read_text()
    for doc in (rayservice, rayjob):
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray.__version__
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[2:-1]:
                assert (ROOT / source).exists(), source


def test_monitoring_selects_the_ray_pods(rayservice):
    monitor = _docs(K8S / "monitoring" / "podmonitor.yaml")[0]
    labels = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    for pod in _pods(rayservice):
        assert labels.items() <= pod["metadata"]["labels"].items()
        assert port in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}


def test_alert_rules_pass_promtool(tmp_path):
    rule = _docs(K8S / "monitoring" / "prometheusrule.yaml")[0]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"SemlineRealtimeTTFTHigh", "SemlineKVCacheNearFull", "SemlineHighErrorRate",
                      "SemlineBatchLaneStalled"}
    tested = {t["alertname"] for case in yaml.safe_load((K8S / "monitoring" / "alerts-test.yaml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == alerts  # a promtool case per alert
    check = _run_promtool(tmp_path, rule, "check", "rules", "semline-rules.yaml")
    assert check.returncode == 0, check.stdout + check.stderr
    test = _run_promtool(tmp_path, rule, "test", "rules", "alerts-test.yaml")
    assert test.returncode == 0, test.stdout + test.stderr


# --- each validation rejects a planted mistake --------------------------------------------------


def test_crd_validation_rejects_planted_mistakes(rayservice):
    unknown = copy.deepcopy(rayservice)
    unknown["spec"]["rayClusterConfig"]["headGroupSpec"]["replicas"] = 1  # heads have no replicas
    assert any("replicas" in e for e in crd_errors(unknown))
    wrong_type = copy.deepcopy(rayservice)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    assert any("maxReplicas" in e for e in crd_errors(wrong_type))
    deep = copy.deepcopy(rayservice)  # inside the pod template too
    deep["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    assert any("imagePullPolcy" in e for e in crd_errors(deep))


def test_serve_config_validation_rejects_planted_mistakes(rayservice):
    good = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    typo = copy.deepcopy(good)
    typo["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 8
    assert any("unknown autoscaling keys ['max_replica']" in e for e in serve_config_errors(typo))
    bad_bounds = copy.deepcopy(good)
    bad_bounds["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] = 9
    assert any("LLMServer" in e for e in serve_config_errors(bad_bounds))
    schema = copy.deepcopy(good)
    schema["applications"][0]["deployments"][1]["num_replicas"] = "many"
    assert any(e.startswith("ServeDeploySchema") for e in serve_config_errors(schema))
    args = copy.deepcopy(good)
    args["applications"][0]["args"]["server"]["num_gpu"] = 1
    assert any(e.startswith("args") and "num_gpu" in e for e in serve_config_errors(args))


def test_core_validation_rejects_planted_mistakes(rayservice):
    claim = _docs(K8S / "storage.yaml")[0]
    wrong_type = copy.deepcopy(claim)
    wrong_type["spec"]["accessModes"] = "ReadWriteOnce"  # a list, not a string
    assert core_errors(wrong_type)
    pod = copy.deepcopy(_pods(rayservice)[1])
    pod["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}  # `limits`
    assert core_errors(pod)


def test_promtool_rejects_planted_mistakes(tmp_path):
    rule = _docs(K8S / "monitoring" / "prometheusrule.yaml")[0]
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][1]["expr"] = "max by (model_name) (ray_semline_kv_cache_usage_perc > 0.95"
    check = _run_promtool(tmp_path, broken, "check", "rules", "semline-rules.yaml")
    assert check.returncode != 0 and "parse error" in (check.stdout + check.stderr)
    lax = copy.deepcopy(rule)  # a threshold that no longer fires on a full cache
    lax["spec"]["groups"][0]["rules"][1]["expr"] = "max by (model_name) (ray_semline_kv_cache_usage_perc) > 1.5"
    test = _run_promtool(tmp_path, lax, "test", "rules", "alerts-test.yaml")
    assert test.returncode != 0 and "SemlineKVCacheNearFull" in (test.stdout + test.stderr)


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_split_model_replicas_reserve_their_workers(tp, pp):
    """tensor_parallel_size T and pipeline_parallel_size P in the config: each replica reserves
    T x P worker bundles (plus its own), worker pods carry T GPUs (a tensor-parallel group per
    pod), and the Ray autoscaler's worker bounds count the GPUs of whole replicas."""
    config = SemlineConfig.from_yaml(K8S / "semline.yaml")
    config.engine.update(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    for doc in (k8s.rayservice(config), k8s.rayjob(config)):
        assert crd_errors(doc) == []
    doc = k8s.rayservice(config)
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert serve_config_errors(serve_config) == []
    app = serve_config["applications"][0]
    assert (app["args"]["engine"]["tensor_parallel_size"], app["args"]["engine"]["pipeline_parallel_size"]) == (tp, pp)
    llm = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    assert llm["placement_group_bundles"] == [{"CPU": 4.0}] + [{"GPU": 1, "CPU": 1}] * (tp * pp)
    assert llm["placement_group_strategy"] == "PACK"
    assert llm["ray_actor_options"]["num_gpus"] == 0  # the workers hold the GPUs
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(tp)
    scaling = config.server.autoscaling
    assert (group["minReplicas"], group["maxReplicas"]) == (scaling.min_replicas * pp, scaling.max_replicas * pp)
    config.kubernetes.worker_gpus = 3
    if tp == 2:  # a tensor-parallel group never straddles pods
        with pytest.raises(ValueError, match="multiple of tensor_parallel_size"):
            k8s.rayservice(config)
