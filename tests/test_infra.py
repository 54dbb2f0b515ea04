"""Static validation of infra/: compose, Kubernetes (kustomize + KEDA), Prometheus, Grafana.

No Docker engine or cluster is needed. Validators:
  - PyYAML                parse every YAML file
  - kubernetes-validate   Kubernetes OpenAPI JSON schemas, bundled in the wheel (no network)
  - jsonschema            compose-spec schema (infra/schemas/compose-spec.json) and our
                          KEDA ScaledObject / TriggerAuthentication schemas
  - promql-parser         parse every PromQL expression (dashboard + alert rules)
  - kustomize             a small pure-Python build (resources, namespace, labels, images,
                          strategic-merge and JSON6902 patches, $patch: delete) that always
                          runs; when `kubectl` is on PATH its bundled kustomize builds too and
                          the two outputs must agree.
Every validator also has a negative test that feeds it a broken input.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
promql_parser = pytest.importorskip("promql_parser")

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SCHEMAS = INFRA / "schemas"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "prod"]
K8S_VERSIONS = ["1.30.0", "1.33.0"]
KEDA_SCHEMAS = {
    "ScaledObject": SCHEMAS / "keda-scaledobject.json",
    "TriggerAuthentication": SCHEMAS / "keda-triggerauthentication.json",
}

ALLOWED_METRICS = {
    "prefixq_queue_depth", "prefixq_jobs",
    "prefixq_rows_completed_total", "prefixq_rows_failed_total",
    "prefixq_prompt_tokens_total", "prefixq_cached_prompt_tokens_total", "prefixq_output_tokens_total",
    "prefixq_kv_cache_usage_ratio", "prefixq_prefix_cache_hit_rate", "prefixq_spec_acceptance_rate",
    "prefixq_spec_mean_accepted_length", "prefixq_cascade_decode_steps",
    "prefixq_model_load_seconds", "prefixq_gpu_memory_bytes",
}
HISTOGRAMS = {"prefixq_ttft_seconds", "prefixq_time_per_output_token_seconds", "prefixq_row_latency_seconds"}
for _h in HISTOGRAMS:
    ALLOWED_METRICS |= {f"{_h}_bucket", f"{_h}_sum", f"{_h}_count"}
# Prometheus' own per-target series, needed for "worker down".
BUILTIN_METRICS = {"up"}


def _yaml_files():
    # infra/local/** belongs to another area of the project; everything else is ours.
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml")
                  and "local" not in p.relative_to(INFRA).parts[:1])


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --------------------------------------------------------------------------- (a) YAML / JSON


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for d in docs:
        assert isinstance(d, dict), f"{path}: top level must be a mapping"


def test_yaml_file_set_is_complete():
    names = {str(p.relative_to(INFRA)) for p in _yaml_files()}
    for needed in ["compose.yaml", "prometheus/prometheus.yml", "prometheus/alerts.yml",
                   "k8s/base/kustomization.yaml", "k8s/overlays/prod/kustomization.yaml",
                   "k8s/cronjob-nightly.yaml"]:
        assert needed in names


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.json")), ids=lambda p: str(p.relative_to(ROOT)))
def test_json_parses(path):
    json.loads(path.read_text())


def test_yaml_parser_rejects_broken_yaml():
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load("a: [1, 2\nb: c")


# --------------------------------------------------------------------------- (b) kustomize


class KustomizeError(Exception):
    pass


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}
NAME_MERGE_LISTS = {"containers", "initContainers", "volumes", "env", "ports", "volumeMounts",
                    "volumeClaimTemplates", "imagePullSecrets"}


def _gvk(obj):
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    return group, version, obj.get("kind")


def _strategic_merge(base, patch, key=None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if k == "$patch":
                continue
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _strategic_merge(out[k], v, k)
            else:
                out[k] = _strip_nulls(copy.deepcopy(v))
        return out
    if (isinstance(base, list) and isinstance(patch, list) and key in NAME_MERGE_LISTS
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        out = [dict(i) for i in base]
        idx = {i["name"]: n for n, i in enumerate(out)}
        for item in patch:
            if item["name"] in idx:
                out[idx[item["name"]]] = _strategic_merge(out[idx[item["name"]]], item, None)
            else:
                out.append(_strip_nulls(copy.deepcopy(item)))
        return out
    return copy.deepcopy(patch)


def _strip_nulls(v):
    if isinstance(v, dict):
        return {k: _strip_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_strip_nulls(x) for x in v]
    return v


def _json_pointer(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")] if path else []


def _json6902(obj, ops):
    obj = copy.deepcopy(obj)
    for op in ops:
        parts = _json_pointer(op["path"])
        parent = obj
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            i = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(i, op["value"])
            elif kind == "replace":
                parent[i] = op["value"]
            elif kind == "remove":
                del parent[i]
            else:
                raise KustomizeError(f"unsupported op {kind}")
        else:
            if kind in ("replace", "remove") and last not in parent:
                raise KustomizeError(f"path {op['path']} does not exist")
            if kind in ("add", "replace"):
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            else:
                raise KustomizeError(f"unsupported op {kind}")
    return obj


def _matches(obj, target):
    group, version, kind = _gvk(obj)
    for k, want in (("group", group), ("version", version), ("kind", kind),
                    ("name", obj["metadata"]["name"])):
        if k in target and target[k] != want:
            return False
    return True


def _pod_specs(obj):
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield spec["template"]["spec"]
    elif obj["kind"] == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif obj["kind"] == "Pod":
        yield spec


def kustomize_build(directory: Path) -> list[dict]:
    """Pure-Python build of the kustomize features used in infra/k8s."""
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"no kustomization.yaml in {directory}")
    k = yaml.safe_load(kfile.read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "patches", "images", "labels",
             "commonLabels", "commonAnnotations"}
    unknown = set(k) - known
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    objs: list[dict] = []
    for res in k.get("resources", []):
        p = (directory / res).resolve()
        if p.is_dir():
            objs += kustomize_build(p)
        elif p.is_file():
            objs += load_docs(p)
        else:
            raise KustomizeError(f"{kfile}: resource {res!r} not found")
    seen = set()
    for o in objs:
        ident = (o.get("kind"), o.get("metadata", {}).get("namespace"), o.get("metadata", {}).get("name"))
        if ident in seen:
            raise KustomizeError(f"duplicate resource {ident}")
        seen.add(ident)

    for patch in k.get("patches", []):
        if "path" in patch:
            pp = directory / patch["path"]
            if not pp.is_file():
                raise KustomizeError(f"{kfile}: patch {patch['path']!r} not found")
            text = pp.read_text()
        else:
            text = patch["patch"]
        body = yaml.safe_load(text)
        target = patch.get("target")
        if isinstance(body, list):  # JSON6902
            if not target:
                raise KustomizeError("JSON6902 patch needs a target")
            hits = [i for i, o in enumerate(objs) if _matches(o, target)]
            if not hits:
                raise KustomizeError(f"patch target {target} matches nothing")
            for i in hits:
                objs[i] = _json6902(objs[i], body)
            continue
        if target is None:
            group, version, kind = _gvk(body)
            target = {"kind": kind, "name": body["metadata"]["name"]}
        hits = [i for i, o in enumerate(objs) if _matches(o, target)]
        if not hits:
            raise KustomizeError(f"patch target {target} matches nothing")
        if body.get("$patch") == "delete":
            objs = [o for i, o in enumerate(objs) if i not in hits]
            continue
        for i in hits:
            objs[i] = _strategic_merge(objs[i], body)

    labels = dict(k.get("commonLabels", {}))
    for entry in k.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeError("only metadata labels are supported by this builder")
        labels.update(entry.get("pairs", {}))
    ns = k.get("namespace")
    for o in objs:
        md = o.setdefault("metadata", {})
        if labels:
            md["labels"] = {**md.get("labels", {}), **labels}
        if k.get("commonAnnotations"):
            md["annotations"] = {**md.get("annotations", {}), **k["commonAnnotations"]}
        if ns:
            if o["kind"] == "Namespace":
                md["name"] = ns
            elif o["kind"] not in CLUSTER_SCOPED:
                md["namespace"] = ns
        for image in k.get("images", []):
            for ps in _pod_specs(o):
                for c in ps.get("containers", []) + ps.get("initContainers", []):
                    name, _, tag = c["image"].partition(":")
                    if "@" in name:
                        continue
                    if name == image["name"]:
                        new = image.get("newName", name)
                        tag = image.get("newTag", tag)
                        c["image"] = f"{new}:{tag}" if tag else new
    return objs


def _by_id(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def built(request):
    return request.param, kustomize_build(request.param)


def test_kustomize_builds(built):
    directory, objs = built
    ids = _by_id(objs)
    for need in [("Deployment", "prefixq-worker"), ("StatefulSet", "redis"), ("Service", "redis"),
                 ("ConfigMap", "prefixq-config"), ("ScaledObject", "prefixq-worker"),
                 ("TriggerAuthentication", "prefixq-redis-auth"), ("Namespace", "prefixq")]:
        assert need in ids, f"{directory}: {need} missing from the build"
    for o in objs:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"].get("namespace") == "prefixq", o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "prefixq"


def test_prod_overlay_changes():
    base = _by_id(kustomize_build(K8S / "base"))
    prod = _by_id(kustomize_build(K8S / "overlays" / "prod"))
    assert ("Secret", "prefixq-credentials") in base
    assert ("Secret", "prefixq-credentials") not in prod, "prod must not ship the placeholder Secret"
    assert prod[("ScaledObject", "prefixq-worker")]["spec"]["maxReplicaCount"] > \
        base[("ScaledObject", "prefixq-worker")]["spec"]["maxReplicaCount"]
    vols = {v["name"]: v for v in prod[("Deployment", "prefixq-worker")]["spec"]["template"]["spec"]["volumes"]}
    assert vols["model-cache"] == {"name": "model-cache",
                                   "persistentVolumeClaim": {"claimName": "prefixq-model-cache"}}
    assert ("PersistentVolumeClaim", "prefixq-model-cache") in prod
    assert prod[("ConfigMap", "prefixq-config")]["data"]["PREFIXQ_S3_SSE"] in ("AES256", "aws:kms")


def _kubectl_build(directory):
    return subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with bundled kustomize) not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kubectl_kustomize_agrees(directory):
    res = _kubectl_build(directory)
    assert res.returncode == 0, res.stderr
    real = _by_id([d for d in yaml.safe_load_all(res.stdout) if d])
    ours = _by_id(kustomize_build(directory))
    assert set(real) == set(ours)
    for key in real:
        assert real[key] == ours[key], f"{key} differs between kubectl kustomize and the Python build"


def test_kustomize_rejects_missing_resource(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - does-not-exist.yaml\n")
    with pytest.raises(KustomizeError):
        kustomize_build(tmp_path)
    if shutil.which("kubectl"):
        assert _kubectl_build(tmp_path).returncode != 0


def test_kustomize_rejects_patch_without_target(tmp_path):
    shutil.copytree(K8S / "base", tmp_path / "base")
    (tmp_path / "ov").mkdir()
    (tmp_path / "ov" / "kustomization.yaml").write_text(
        "resources: [../base]\npatches:\n  - path: p.yaml\n")
    (tmp_path / "ov" / "p.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: no-such-worker}\nspec: {replicas: 1}\n")
    with pytest.raises(KustomizeError):
        kustomize_build(tmp_path / "ov")


# --------------------------------------------------------------------------- (c) k8s schemas


def validate_k8s(obj, version):
    """Raise if obj is invalid: core kinds via kubernetes-validate, KEDA kinds via our schemas."""
    if obj.get("apiVersion", "").startswith("keda.sh/"):
        schema = json.loads(KEDA_SCHEMAS[obj["kind"]].read_text())
        jsonschema.validate(obj, schema, cls=jsonschema.Draft202012Validator)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


def _all_k8s_objects():
    out = []
    for d in KUSTOMIZATIONS:
        for o in kustomize_build(d):
            out.append((f"{d.relative_to(K8S)}:{o['kind']}/{o['metadata']['name']}", o))
    for o in load_docs(K8S / "cronjob-nightly.yaml"):
        out.append((f"cronjob-nightly:{o['kind']}/{o['metadata']['name']}", o))
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name,obj", _all_k8s_objects(), ids=[n for n, _ in _all_k8s_objects()])
def test_k8s_schema(name, obj, version):
    validate_k8s(obj, version)


def test_keda_schemas_are_valid_schemas():
    for p in KEDA_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(json.loads(p.read_text()))


def _base():
    return _by_id(kustomize_build(K8S / "base"))


def test_k8s_validator_rejects_broken_deployment():
    dep = copy.deepcopy(_base()[("Deployment", "prefixq-worker")])
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["contaners"] = typo["spec"]["template"]["spec"].pop("containers")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(typo, K8S_VERSIONS[0])
    bad_type = copy.deepcopy(dep)
    bad_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(bad_type, K8S_VERSIONS[0])


def test_keda_schema_rejects_broken_scaledobject():
    so = _base()[("ScaledObject", "prefixq-worker")]
    cases = []
    c = copy.deepcopy(so); c["spec"]["minReplicaCount"] = "0"; cases.append(c)          # noqa: E702
    c = copy.deepcopy(so); c["spec"]["triggers"] = []; cases.append(c)                   # noqa: E702
    c = copy.deepcopy(so); c["spec"]["maxReplicas"] = 4; cases.append(c)                 # noqa: E702
    c = copy.deepcopy(so); del c["spec"]["triggers"][0]["metadata"]["listName"]; cases.append(c)  # noqa: E702
    c = copy.deepcopy(so); c["spec"]["triggers"][1]["metadata"]["threshold"] = 1; cases.append(c)  # noqa: E702
    for case in cases:
        with pytest.raises(jsonschema.ValidationError):
            validate_k8s(case, K8S_VERSIONS[0])


# --------------------------------------------------------------------------- k8s semantics


def _worker_container(dep):
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    return c


def test_worker_deployment_semantics():
    objs = _base()
    dep = objs[("Deployment", "prefixq-worker")]
    pod = dep["spec"]["template"]["spec"]
    c = _worker_container(dep)
    assert "replicas" not in dep["spec"], "KEDA owns replicas; a fixed value fights the HPA"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert "preStop" in c["lifecycle"] and "TERM" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/metrics"
        assert c[probe]["httpGet"]["port"] in ("metrics", 9090)
    assert c["ports"][0]["containerPort"] == 9090
    refs = [next(iter(e.values()))["name"] for e in c["envFrom"]]
    assert refs == ["prefixq-config", "prefixq-credentials"], "Secret must come after the ConfigMap"
    cm = objs[("ConfigMap", "prefixq-config")]["data"]
    for key in ("PREFIXQ_REDIS_URL", "PREFIXQ_STORE_URL", "PREFIXQ_S3_ENDPOINT", "PREFIXQ_MODEL", "PREFIXQ_QUEUE"):
        assert key in cm
    # every $(VAR) in args is defined
    for arg in c["args"]:
        for var in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", arg):
            assert var in cm, var
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["model-cache"] == "/models"
    assert "model-cache" in {v["name"] for v in pod["volumes"]}
    secret = objs[("Secret", "prefixq-credentials")]
    assert all("CHANGE-ME" in v for v in secret["stringData"].values()), "example Secret must hold placeholders only"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "REDIS_PASSWORD"} <= set(secret["stringData"])


def test_redis_statefulset_has_aof_and_persistence():
    objs = _base()
    sts = objs[("StatefulSet", "redis")]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    data_dir = args[args.index("--dir") + 1]
    (vct,) = sts["spec"]["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}[vct["metadata"]["name"]] == data_dir
    assert sts["spec"]["serviceName"] in {n for (k, n) in objs if k == "Service"}
    assert objs[("Service", "redis")]["spec"]["ports"][0]["port"] == 6379


def check_scaledobject(so, dep_name, queue):
    """Return a list of problems with how the ScaledObject counts work."""
    errs = []
    spec = so["spec"]
    if spec["scaleTargetRef"]["name"] != dep_name:
        errs.append("scaleTargetRef does not point at the worker Deployment")
    if spec.get("minReplicaCount") != 0:
        errs.append("minReplicaCount must be 0 (scale to zero)")
    if not spec.get("maxReplicaCount"):
        errs.append("maxReplicaCount missing")
    if "cooldownPeriod" not in spec:
        errs.append("cooldownPeriod missing")
    trig = {t["type"]: t for t in spec["triggers"]}
    redis = trig.get("redis")
    if not redis or redis["metadata"].get("listName") != f"rq:queue:{queue}":
        errs.append(f"need a redis list trigger on rq:queue:{queue} (wakes the Deployment from 0)")
    prom = trig.get("prometheus")
    running_counted = prom is not None and "prefixq_queue_depth" in prom["metadata"].get("query", "")
    if not running_counted:
        errs.append("running jobs (rq:wip:<queue>) are not counted: add a prometheus trigger on prefixq_queue_depth")
    elif prom["metadata"].get("ignoreNullValues", "true") != "true":
        errs.append("prometheus trigger must treat 'no workers, no series' as 0")
    return errs


def test_scaledobject_counts_queued_and_running():
    objs = _base()
    queue = objs[("ConfigMap", "prefixq-config")]["data"]["PREFIXQ_QUEUE"]
    so = objs[("ScaledObject", "prefixq-worker")]
    assert check_scaledobject(so, "prefixq-worker", queue) == []
    auth = so["spec"]["triggers"][0]["authenticationRef"]["name"]
    assert ("TriggerAuthentication", auth) in objs
    promql_parser.parse(so["spec"]["triggers"][1]["metadata"]["query"])


def test_scaledobject_check_rejects_list_only_scaling():
    so = copy.deepcopy(_base()[("ScaledObject", "prefixq-worker")])
    so["spec"]["triggers"] = [t for t in so["spec"]["triggers"] if t["type"] == "redis"]
    errs = check_scaledobject(so, "prefixq-worker", "prefixq")
    assert any("running jobs" in e for e in errs)
    so["spec"]["minReplicaCount"] = 1
    assert any("scale to zero" in e for e in check_scaledobject(so, "prefixq-worker", "prefixq"))


def test_nightly_cronjob():
    (cj,) = load_docs(K8S / "cronjob-nightly.yaml")
    assert cj["kind"] == "CronJob"
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    assert cj["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    (c,) = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    script = " ".join(c["args"])
    assert "prefixq submit" in script
    # `$$` is Kubernetes' escape for `$`; an unescaped $(date) would be left for the
    # kubelet's $(VAR) expansion.
    assert "$$(date -u +%F)" in script and re.search(r"(?<!\$)\$\(date", script) is None
    assert "s3://" in script and "/evals/" in script


# --------------------------------------------------------------------------- (d) compose

COMPOSE = INFRA / "compose.yaml"


def _compose():
    return yaml.safe_load(COMPOSE.read_text())


def validate_compose_schema(doc):
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    # The bundled (2020) schema names draft 2019-09 with a non-canonical URI.
    jsonschema.Draft201909Validator(schema).validate(doc)


def check_compose(doc, base=INFRA):
    """Semantic rules the schema can't express. Returns a list of problems."""
    errs = []
    services = doc.get("services", {})
    volumes = set((doc.get("volumes") or {}).keys())
    for need in ("redis", "minio", "minio-init", "worker", "prometheus", "grafana"):
        if need not in services:
            errs.append(f"service {need} missing")
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep in (deps if isinstance(deps, list) else deps.keys()):
            if dep not in services:
                errs.append(f"{name} depends on unknown service {dep}")
        for v in svc.get("volumes", []):
            src = (v if isinstance(v, str) else v.get("source", "")).split(":")[0]
            if src.startswith((".", "/")):
                if not (base / src).exists():
                    errs.append(f"{name}: bind mount source {src} does not exist")
            elif src and src not in volumes:
                errs.append(f"{name}: named volume {src} is not declared")
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = base / build.get("context", ".")
            if not (ctx / build.get("dockerfile", "Dockerfile")).is_file():
                errs.append(f"{name}: Dockerfile not found")
    redis = services.get("redis", {})
    cmd = redis.get("command", [])
    cmd = cmd.split() if isinstance(cmd, str) else cmd
    if "--appendonly" not in cmd or cmd[cmd.index("--appendonly") + 1] != "yes":
        errs.append("redis: appendonly yes missing")
    if "--appendfsync" not in cmd or cmd[cmd.index("--appendfsync") + 1] != "everysec":
        errs.append("redis: appendfsync everysec missing")
    if not any(str(v).endswith(":/data") and not str(v).startswith((".", "/")) for v in redis.get("volumes", [])):
        errs.append("redis: /data is not on a named volume")
    worker = services.get("worker", {})
    devices = (worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []))
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        errs.append("worker: no nvidia GPU reservation")
    grace = str(worker.get("stop_grace_period", "10s"))
    if not grace.endswith("s") or int(grace[:-1]) < 60:
        errs.append("worker: stop_grace_period must be >= 60s for the drain")
    init = services.get("minio-init", {})
    if "service_completed_successfully" not in json.dumps(worker.get("depends_on", {})):
        errs.append("worker must wait for minio-init to complete")
    script = json.dumps(init.get("entrypoint", ""))
    if "mc mb" not in script or "ilm" not in script:
        errs.append("minio-init must create the bucket and the lifecycle rule")
    return errs


def test_compose_schema():
    validate_compose_schema(_compose())


def test_compose_semantics():
    assert check_compose(_compose()) == []
    lifecycle = json.loads((INFRA / "minio" / "lifecycle.json").read_text())
    assert any("AbortIncompleteMultipartUpload" in r for r in lifecycle["Rules"])


def test_compose_schema_rejects_broken_file():
    doc = _compose()
    doc["services"]["worker"]["imagee"] = "typo"
    with pytest.raises(jsonschema.ValidationError):
        validate_compose_schema(doc)
    doc = _compose()
    doc["services"]["redis"]["healthcheck"]["retries"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_compose_schema(doc)


def test_compose_semantics_reject_broken_file():
    doc = _compose()
    doc["services"]["redis"]["command"] = ["redis-server"]
    del doc["services"]["worker"]["deploy"]
    doc["services"]["grafana"]["depends_on"] = ["prometheuss"]
    errs = check_compose(doc)
    assert any("appendonly" in e for e in errs)
    assert any("GPU" in e for e in errs)
    assert any("prometheuss" in e for e in errs)


def test_dockerfile():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM (python:3\.11-slim|nvidia/cuda:\S+runtime\S*)", text, re.M)
    assert re.search(r"^RUN .*pip install \.", text, re.M)
    assert re.search(r'^ENTRYPOINT \[.*"prefixq"\]', text, re.M), "exec-form ENTRYPOINT so SIGTERM reaches the worker"
    assert "EXPOSE 9090" in text


# --------------------------------------------------------------------------- (e) Prometheus / Grafana

GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def metric_names(expr: str) -> set[str]:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    ast = promql_parser.parse(expr)   # raises ValueError on a syntax error
    names = set()

    def visit(node):
        # walk() descends into MatrixSelector, subqueries and calls by itself.
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            if name:
                names.add(name)
    promql_parser.walk(ast, pre_visit=visit)
    return names


def dashboard_problems(dash) -> list[str]:
    errs = []
    exprs = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))
    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            exprs.append((p.get("title"), t.get("expr", "")))
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"label_values\((\w+)", q or "")
        if m and m.group(1) not in ALLOWED_METRICS:
            errs.append(f"variable {var['name']}: unknown metric {m.group(1)}")
    for title, e in exprs:
        try:
            used = metric_names(e)
        except ValueError as ex:
            errs.append(f"{title}: bad PromQL {e!r}: {ex}")
            continue
        unknown = used - ALLOWED_METRICS - BUILTIN_METRICS
        if unknown:
            errs.append(f"{title}: unknown metrics {sorted(unknown)}")
    return errs


def _dashboard():
    return json.loads((INFRA / "grafana" / "prefixq-dashboard.json").read_text())


def _dash_exprs(dash):
    return " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))


def test_dashboard_metrics_and_promql():
    dash = _dashboard()
    errs = dashboard_problems(dash)
    assert errs == [], errs
    text = _dash_exprs(dash)
    for m in ALLOWED_METRICS - {f"{h}_{s}" for h in HISTOGRAMS for s in ("sum", "count")}:
        assert m in text, f"dashboard does not show {m}"
    for h in HISTOGRAMS:
        for q in ("0.5", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({h}_bucket" in text
    for counter in ("prefixq_rows_completed_total", "prefixq_output_tokens_total"):
        assert f"rate({counter}" in text
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"]


def test_dashboard_check_rejects_unknown_metric_and_bad_promql():
    dash = _dashboard()
    dash["panels"][1]["targets"][0]["expr"] = "rate(prefixq_made_up_total[5m])"
    dash["panels"][2]["targets"][0]["expr"] = "sum(rate(prefixq_output_tokens_total[5m])"
    errs = dashboard_problems(dash)
    assert any("prefixq_made_up_total" in e for e in errs)
    assert any("bad PromQL" in e for e in errs)


def test_grafana_provisioning_points_at_dashboard():
    compose = _compose()
    mounts = compose["services"]["grafana"]["volumes"]
    prov = yaml.safe_load((INFRA / "grafana" / "provisioning" / "dashboards" / "prefixq.yaml").read_text())
    path = prov["providers"][0]["options"]["path"]
    assert any(m.startswith("./grafana/prefixq-dashboard.json:" + path) for m in mounts)
    ds = yaml.safe_load((INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"


def rule_problems(doc) -> list[str]:
    """Structure of a Prometheus rule file (what promtool check rules looks at) + PromQL syntax."""
    errs = []
    if set(doc) != {"groups"}:
        errs.append("top level must be exactly {groups}")
    names = set()
    for g in doc.get("groups", []):
        if not g.get("name") or g["name"] in names:
            errs.append(f"group name missing or duplicate: {g.get('name')}")
        names.add(g.get("name"))
        for r in g.get("rules", []):
            if ("alert" in r) == ("record" in r):
                errs.append(f"rule needs exactly one of alert/record: {r}")
            extra = set(r) - {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if extra:
                errs.append(f"{r.get('alert')}: unknown fields {sorted(extra)}")
            if not isinstance(r.get("expr"), str) or not r["expr"].strip():
                errs.append(f"{r.get('alert')}: expr missing")
                continue
            if "for" in r and not re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(r["for"])):
                errs.append(f"{r.get('alert')}: bad duration {r['for']}")
            try:
                unknown = metric_names(r["expr"]) - ALLOWED_METRICS - BUILTIN_METRICS
            except ValueError as ex:
                errs.append(f"{r.get('alert')}: bad PromQL: {ex}")
                continue
            if unknown:
                errs.append(f"{r.get('alert')}: unknown metrics {sorted(unknown)}")
            for k, v in {**r.get("labels", {}), **r.get("annotations", {})}.items():
                if not isinstance(v, str):
                    errs.append(f"{r.get('alert')}: {k} must be a string")
    return errs


def _alerts():
    return yaml.safe_load((INFRA / "prometheus" / "alerts.yml").read_text())


def test_alert_rules():
    doc = _alerts()
    assert rule_problems(doc) == []
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    assert re.search(r'up\{job="prefixq-worker"\}\s*==\s*0', rules["PrefixqWorkerDown"]["expr"])
    q = rules["PrefixqQueueGrowingNoWorkers"]
    assert "prefixq_queue_depth" in q["expr"] and "up{" in q["expr"] and q["for"] == "10m"
    assert 'prefixq_jobs{state="dead"}' in rules["PrefixqDeadLetteredJobs"]["expr"]
    for r in rules.values():
        assert r["labels"]["severity"] in ("critical", "warning")


def test_rule_check_rejects_broken_rules():
    doc = _alerts()
    doc["groups"][0]["rules"][0]["expr"] = "up{job=\"prefixq-worker\" == 0"
    doc["groups"][0]["rules"][1].pop("expr")
    doc["groups"][0]["rules"][2]["for"] = "ten minutes"
    errs = rule_problems(doc)
    assert len(errs) == 3, errs


def test_prometheus_config():
    cfg = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    jobs = {s["job_name"]: s for s in cfg["scrape_configs"]}
    assert "prefixq-worker" in jobs, "alerts select job=\"prefixq-worker\""
    w = jobs["prefixq-worker"]
    assert w.get("metrics_path", "/metrics") == "/metrics"
    ports = [sd["port"] for sd in w.get("dns_sd_configs", [])] + \
        [int(t.rsplit(":", 1)[1]) for sc in w.get("static_configs", []) for t in sc["targets"]]
    assert ports and all(p == 9090 for p in ports)
    compose = _compose()
    mount = next(m for m in compose["services"]["prometheus"]["volumes"] if m.startswith("./prometheus:"))
    container_dir = mount.split(":")[1]
    for rf in cfg["rule_files"]:
        assert rf.startswith(container_dir + "/")
        assert (INFRA / "prometheus" / rf[len(container_dir) + 1:]).is_file()


# --------------------------------------------------------------------------- docs


def test_deploy_doc_covers_operations():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for needle in ("compose.yaml", "kustomize", "KEDA", "rq:wip:", "minReplicaCount", "appendfsync",
                   "rediss://", "PREFIXQ_S3_SSE", "aws:kms", "AES256", "Secret"):
        assert needle in doc, needle
