"""The edge DaemonSet of deploy/k8s/base: its command parses with our CLI, it uses real edge settings,
and the node it describes runs (no crash loop) on a cluster without the optional TLS Secret.
(Rendering, validation and references of all the manifests: tests/deploy/test_k8s.py.)"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_node.client import channel_credentials
from edge_node.node import EdgeNode
from edge_node.settings import EdgeSettings
from splitclip.cli import build_parser
from splitclip.settings import SettingsError, env_name
from tests.edge.conftest import PROMPTS

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base"
NODE_NAME = "edge-host-1"


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def _rendered() -> dict[tuple[str, str], dict]:
    """What `kubectl kustomize deploy/k8s/base` renders (the kustomization's files when kubectl is missing)."""
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=120
        ).stdout
        docs = list(yaml.safe_load_all(out))
    else:
        kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
        docs = [d for name in kustomization["resources"] for d in _docs(name)]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _edge_pod(tmp_path: Path, *, tls_secret: dict[str, str] | None = None) -> dict[str, str]:
    """The edge container's environment as the kubelet gives it, with each volume mounted under
    tmp_path (paths in the environment point there). `tls_secret` None: that Secret does not exist."""
    docs = _rendered()
    pod = docs[("DaemonSet", "splitclip-edge")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, Path] = {}
    for m in container["volumeMounts"]:
        v, where = volumes[m["name"]], tmp_path / m["name"]
        where.mkdir()
        data: dict[str, str] = {}
        if "configMap" in v:
            data = docs[("ConfigMap", v["configMap"]["name"])]["data"]
        elif "secret" in v:
            name = v["secret"]["secretName"]
            if name == "splitclip-edge-tls":
                assert v["secret"].get("optional") is True  # or the pod would not even start without it
                data = tls_secret or {}
            else:
                data = docs[("Secret", name)]["stringData"]
        for key, text in data.items():
            (where / key).write_text(text)
        mounts[m["mountPath"]] = where
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(docs[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
            env[e["name"]] = NODE_NAME
    for key, value in env.items():
        for mount_path, where in mounts.items():
            if value.startswith(mount_path + "/"):
                env[key] = str(where / value[len(mount_path) + 1 :])
    return env


def test_daemonset_command_parses_and_settings_exist() -> None:
    config, ds = _docs("edge-daemonset.yaml")
    assert ds["kind"] == "DaemonSet"
    container = ds["spec"]["template"]["spec"]["containers"][0]
    cmd = container["command"]
    assert cmd[0] == "splitclip"
    args = build_parser().parse_args(cmd[1:])
    assert args._module == "edge_node.watch"
    known = {env_name(f.name) for f in fields(EdgeSettings)} | {"SPLITCLIP_NODE_TOKEN_FILE"}
    names = [k for k in config["data"] if k.startswith("SPLITCLIP_")] + [e["name"] for e in container["env"]]
    for name in names:
        assert name in known, f"{name} is not an edge setting"
    labels = config["data"]["labels.txt"].splitlines()
    assert labels and all(line.strip() for line in labels)


def test_the_node_runs_without_its_tls_secret(
    tmp_path: Path, bundle: Path, images: list[np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    env = _edge_pod(tmp_path)
    s = EdgeSettings.from_env(env, bundle=bundle, cloud="127.0.0.1:1")  # the image's bundle; no cloud here
    assert s.node_id == NODE_NAME and s.node_token == "change-me"
    assert s.tls_ca is not None and not s.tls_ca.exists() and s.tls_ca_optional
    with caplog.at_level(logging.INFO, logger="splitclip.edge"), EdgeNode(settings=s) as node:
        r = node.classify(images[0], PROMPTS)
    assert r.ok and r.mode == "local"
    said = [rec.getMessage() for rec in caplog.records if "TLS CA" in rec.getMessage()]
    assert len(said) == 1 and "\n" not in said[0], said
    assert str(s.tls_ca) in said[0] and "system" in said[0]


def test_the_tls_secret_when_there_is_used_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = _edge_pod(tmp_path, tls_secret={"ca.crt": "-----BEGIN CERTIFICATE-----\n"})
    s = EdgeSettings.from_env(env)
    assert s.tls_ca is not None and s.tls_ca.is_file()
    with caplog.at_level(logging.INFO, logger="splitclip.edge"):
        assert channel_credentials(s) is not None
    assert not caplog.records


def test_a_configured_ca_that_is_missing_is_a_clear_error_outside_the_optional_mode(tmp_path: Path) -> None:
    env = _edge_pod(tmp_path)
    del env["SPLITCLIP_TLS_CA_OPTIONAL"]
    s = EdgeSettings.from_env(env)
    with pytest.raises(SettingsError, match=r"^SPLITCLIP_TLS_CA='.*/tls/ca.crt' is not a file \(set "):
        channel_credentials(s)
    assert channel_credentials(EdgeSettings.from_env({})) is None  # no CA configured: insecure, as before
