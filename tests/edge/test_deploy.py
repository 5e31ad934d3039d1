"""deploy/k8s/edge-daemonset.yaml: its command parses with our CLI, and it uses real settings and secrets."""

from __future__ import annotations

from pathlib import Path

import yaml

from splitclip.cli import build_parser

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def test_daemonset_command_parses_and_settings_exist() -> None:
    config, ds = _docs("edge-daemonset.yaml")
    assert ds["kind"] == "DaemonSet"
    container = ds["spec"]["template"]["spec"]["containers"][0]
    cmd = container["command"]
    assert cmd[0] == "splitclip"
    args = build_parser().parse_args(cmd[1:])
    assert args._module == "edge_node.watch"
    settings_doc = (Path(__file__).resolve().parents[2] / "edge_node" / "settings.py").read_text()
    names = [k for k in config["data"] if k.startswith("SPLITCLIP_")] + [e["name"] for e in container["env"]]
    for name in names:
        assert name in settings_doc, f"{name} is not an edge setting"
    labels = config["data"]["labels.txt"].splitlines()
    assert labels and all(line.strip() for line in labels)


def test_daemonset_mounts_the_cloud_token_secret() -> None:
    secret_names = {d["metadata"]["name"] for d in _docs("secret.yaml") if d["kind"] == "Secret"}
    _, ds = _docs("edge-daemonset.yaml")
    volumes = ds["spec"]["template"]["spec"]["volumes"]
    token = next(v for v in volumes if v["name"] == "token")
    assert token["secret"]["secretName"] in secret_names
