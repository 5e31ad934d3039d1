"""TLS channel credentials (SPLITCLIP_TLS_CA): the node talks split mode to a TLS gRPC server whose
certificate it trusts, falls back to local when it speaks plaintext to that server, and with an
optional CA that is absent (SPLITCLIP_TLS_CA_OPTIONAL) still speaks TLS, trusting the system's CAs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_node.node import EdgeNode
from tests.edge.conftest import PROMPTS
from tests.edge.refcloud import RefCloud


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, crt


@pytest.fixture
def tls_cloud(bundle: Path, cert: tuple[Path, Path]):
    key, crt = cert
    rc = RefCloud(bundle)
    addr = rc.start(tls=(key.read_bytes(), crt.read_bytes()))
    yield rc, addr, crt
    rc.stop()


def test_tls_split_mode_with_the_trusted_ca(bundle: Path, images: list[np.ndarray], tls_cloud) -> None:
    rc, addr, crt = tls_cloud
    with EdgeNode(bundle, cloud=addr, tls_ca=crt, codec="lossless") as node:
        assert node.mode == "split", node.mode_reason
        r = node.classify(images[0], PROMPTS)
    assert r.mode == "split" and rc.classify_calls >= 1


def test_plaintext_to_a_tls_server_answers_locally(bundle: Path, images: list[np.ndarray], tls_cloud) -> None:
    _, addr, _ = tls_cloud
    with EdgeNode(bundle, cloud=addr, codec="int8-zstd", hello_timeout_s=1.0) as node:
        assert node.mode == "local"
        r = node.classify(images[0], PROMPTS)
    assert r.mode == "local" and r.ok


def test_an_absent_optional_ca_means_tls_with_the_system_cas(
    bundle: Path, images: list[np.ndarray], tls_cloud, tmp_path: Path
) -> None:
    rc, addr, crt = tls_cloud
    absent = tmp_path / "not-mounted" / "ca.crt"
    # the system's CAs do not trust this self-signed certificate: the handshake fails, the node answers
    # locally, and no call ever reaches the server
    with EdgeNode(
        bundle, cloud=addr, codec="int8-zstd", tls_ca=absent, tls_ca_optional=True, hello_timeout_s=1.0
    ) as node:
        assert node.mode == "local"
        r = node.classify(images[0], PROMPTS)
    assert r.mode == "local" and r.ok and rc.classify_calls == 0
    with EdgeNode(bundle, cloud=addr, tls_ca=crt, tls_ca_optional=True, codec="lossless") as node:
        assert node.mode == "split", node.mode_reason  # when it is there, the optional CA is used
