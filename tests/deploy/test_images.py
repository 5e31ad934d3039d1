"""Dockerfile.cloud, Dockerfile.edge and .dockerignore read statically (no podman here; the images are
built and run by `make image-test`, deploy/images/image-test.sh, docs/images.md).

Both take their base as ARG BASE and are multi-stage with a runtime stage that copies the built venv
and runs as a non-root user; the edge one installs the `edge` extra only and runs `splitclip edge
watch`; the cloud one carries launch.py's Ray settings; every path they COPY is in the build context.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cloud_service import launch

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
DOCKERFILES = {"cloud": ROOT / "Dockerfile.cloud", "edge": ROOT / "Dockerfile.edge"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name} ends in a continuation line"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each FROM stage (the ARGs before the first FROM are left out)."""
    out: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in rest.split()))
    return env


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_base_is_a_build_argument_and_the_build_is_multi_stage(name: str) -> None:
    ins = instructions(DOCKERFILES[name])
    assert ins[0] == ("ARG", "BASE=localhost/splitclip-base:bookworm"), ins[0]
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms == ["${BASE} AS build", "${BASE}"], froms


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_runtime_stage_copies_the_venv_runs_as_a_non_root_user_and_builds_nothing(name: str) -> None:
    runtime = stages(DOCKERFILES[name])[-1]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, users[-1]  # numeric: Kubernetes' runAsNonRoot can check it
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    runs = " ".join(rest for word, rest in runtime if word == "RUN")
    for tool in ("pip install", "pip wheel", "gcc", "build-essential", "python3-dev"):
        assert tool not in runs, f"{name}: the runtime stage runs {tool!r}"
    assert env_of(runtime)["PATH"].startswith("/opt/venv/bin:")


def installed_extras(path: Path) -> set[str]:
    """The extras the build stage installs (the arguments of deploy/images/requirements.py)."""
    runs = " ".join(rest for word, rest in stages(path)[0] if word == "RUN")
    calls = re.findall(r"requirements\.py pyproject\.toml ([\w ,-]+?) >", runs)
    assert calls, f"{path.name} does not install from requirements.py"
    return {extra for call in calls for extra in call.split()}


def test_the_edge_image_installs_the_edge_extra_only_and_runs_the_watcher() -> None:
    edge = DOCKERFILES["edge"]
    assert installed_extras(edge) == {"edge"}
    runs = " ".join(rest for word, rest in stages(edge)[0] if word == "RUN")
    # the wheel goes in without its dependencies: nothing beyond the extra's requirements
    assert "pip install --no-deps /wheels/splitclip-" in runs
    assert "[" not in runs.split("pip install --no-deps", 1)[1].split("&&")[0]
    entry = [rest for word, rest in stages(edge)[-1] if word == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["splitclip", "edge", "watch"]]


def test_the_cloud_image_installs_the_cloud_extra_and_no_torch() -> None:
    assert installed_extras(DOCKERFILES["cloud"]) == {"cloud"}


def requirements(*extras: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(IMAGES / "requirements.py"), str(ROOT / "pyproject.toml"), *extras],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


def names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_requirements_of_an_extra_are_the_core_plus_that_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    edge, cloud = requirements("edge"), requirements("cloud")
    assert edge == project["dependencies"] + project["optional-dependencies"]["edge"]
    assert "torch" not in names(edge) | names(cloud)
    assert "ray" not in names(edge)
    assert "ray" in names(cloud)


def test_requirements_of_an_unknown_extra_is_a_one_line_error() -> None:
    p = subprocess.run(
        [sys.executable, str(IMAGES / "requirements.py"), str(ROOT / "pyproject.toml"), "edg"],
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        "error: no extra edg in " + str(ROOT / "pyproject.toml") + " (has edge, cloud, partition, dev)"
    ]


def test_the_cloud_image_sets_the_ray_settings_launch_py_uses() -> None:
    env = env_of(stages(DOCKERFILES["cloud"])[-1])
    expected = {**launch.SERVE_ENV, **{f"RAY_{k}": str(v) for k, v in launch.RAY_SYSTEM_CONFIG.items()}}
    assert {k: env.get(k) for k in expected} == expected


def context_rules() -> list[tuple[bool, str]]:
    """.dockerignore as (include?, pattern) in order; the last matching rule wins."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def in_context(path: str) -> bool:
    """Whether `path` (relative to the repo) reaches the build context: a rule for a folder covers
    what is under it; `**/` matches any depth (the subset of the syntax .dockerignore uses here)."""
    included = True
    parts = path.split("/")
    for include, pattern in context_rules():
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if pattern.startswith("**/"):
            hit = hit or any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        if hit:
            included = include
    return included


def test_the_build_context_leaves_out_the_venv_bundles_caches_and_generated_code() -> None:
    for path in (
        ".venv/bin/python",
        "bundles/demo/manifest.json",
        "scratch/x",
        ".git/HEAD",
        ".pytest_cache/v",
        "splitclip/__pycache__/cli.cpython-311.pyc",
        "splitclip/wire/splitclip_pb2.py",
        "splitclip/wire/PROTO_SHA256",
        "models/demo-clip/model.safetensors",
    ):
        assert not in_context(path), path
    assert in_context("splitclip/cli.py")
    assert in_context("protos/splitclip.proto")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_path_copied_from_the_context_is_in_it(name: str) -> None:
    for stage in stages(DOCKERFILES[name]):
        for word, rest in stage:
            if word != "COPY" or rest.startswith("--from"):
                continue
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"
                assert in_context(src), f"{name}: COPY {src}: left out by .dockerignore"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_image_holds_every_package_the_project_ships(name: str) -> None:
    """The wheel is built from what the Dockerfile copies: a package left out would be missing."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    shipped = {p.rstrip("*") for p in include}
    copied = {rest.split()[0] for word, rest in stages(DOCKERFILES[name])[0] if word == "COPY"}
    assert shipped <= copied, shipped - copied


def test_make_has_the_image_targets_outside_make_test() -> None:
    make = (ROOT / "Makefile").read_text()
    targets = dict(re.findall(r"^([\w-]+):(.*)$", make, flags=re.M))
    assert "deploy/images/build.sh" in make.split("\nimages:", 1)[1].split("\n\n", 1)[0]
    assert "deploy/images/image-test.sh" in make.split("\nimage-test:", 1)[1].split("\n\n", 1)[0]
    for target in ("test", "lint", "install"):
        assert "image" not in targets[target], (target, targets[target])
