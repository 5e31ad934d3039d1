"""splitclip.protogen: the generated gRPC code exists, is current, and staleness is detected."""

from __future__ import annotations

import pytest

from splitclip import protogen


def test_generated_code_is_current() -> None:
    protogen.ensure_current()
    from splitclip.wire import pb, pb_grpc

    assert hasattr(pb_grpc, "SplitClipStub")
    assert {m.name for m in pb.DESCRIPTOR.services_by_name["SplitClip"].methods} == {
        "Classify", "ClassifyStream", "EncodeText", "Hello", "Search", "Upload",
    }  # fmt: skip


def test_stale_and_missing_are_detected(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    stamp = tmp_path / "PROTO_SHA256"
    monkeypatch.setattr(protogen, "STAMP", stamp)
    with pytest.raises(protogen.StaleProtoError, match="missing"):
        protogen.ensure_current()
    stamp.write_text("0" * 64)
    with pytest.raises(protogen.StaleProtoError, match="stale"):
        protogen.ensure_current()


def test_generate_writes_the_modules_and_the_stamp_where_asked(tmp_path) -> None:
    protogen.generate(tmp_path / "wire")
    assert {p.name for p in (tmp_path / "wire").iterdir()} >= {*protogen.GENERATED, protogen.STAMP_NAME}
    assert (tmp_path / "wire" / protogen.STAMP_NAME).read_text().strip() == protogen.proto_digest()


def test_an_install_without_the_proto_trusts_its_stamp_unless_code_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setattr(protogen, "PROTO", tmp_path / "absent.proto")  # as in site-packages
    protogen.ensure_current()
    monkeypatch.setattr(protogen, "OUT_DIR", tmp_path)
    monkeypatch.setattr(protogen, "STAMP", tmp_path / protogen.STAMP_NAME)
    protogen.STAMP.write_text("0" * 64)
    with pytest.raises(protogen.StaleProtoError, match="missing .*splitclip_pb2.py"):
        protogen.ensure_current()
