"""splitclip.protogen: the generated gRPC code exists, is current, and staleness is detected."""

from __future__ import annotations

import pytest

from splitclip import protogen


def test_generated_code_is_current() -> None:
    protogen.ensure_current()
    from splitclip.wire import pb, pb_grpc

    assert hasattr(pb_grpc, "SplitClipStub")
    assert {m.name for m in pb.DESCRIPTOR.services_by_name["SplitClip"].methods} == {
        "Classify", "ClassifyStream", "EncodeText", "Hello",
    }  # fmt: skip


def test_stale_and_missing_are_detected(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    stamp = tmp_path / "PROTO_SHA256"
    monkeypatch.setattr(protogen, "STAMP", stamp)
    with pytest.raises(protogen.StaleProtoError, match="missing"):
        protogen.ensure_current()
    stamp.write_text("0" * 64)
    with pytest.raises(protogen.StaleProtoError, match="stale"):
        protogen.ensure_current()
