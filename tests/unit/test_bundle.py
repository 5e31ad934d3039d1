"""splitclip.bundle: loading verifies every hash; tampered, missing or mismatched files are clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from splitclip.bundle import BundleError, bundle_id_of, content_digests, load_bundle, seal, write_manifest


@pytest.fixture
def bundle_copy(tiny_bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, dst)
    return dst


def test_loads_and_id_is_derived_from_hashes(tiny_bundle_dir: Path) -> None:
    b = load_bundle(tiny_bundle_dir)
    assert b.id == bundle_id_of(json.loads((tiny_bundle_dir / "manifest.json").read_text()))
    assert b.id.startswith("b-") and len(b.id) == 18


def test_tampered_file(bundle_copy: Path) -> None:
    p = bundle_copy / "vision" / "block_01.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vision/block_01\.onnx is tampered or corrupt"):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify=False)  # explicit opt-out still reads the manifest


def test_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "text.onnx").unlink()
    with pytest.raises(BundleError, match=r"text\.onnx is missing"):
        load_bundle(bundle_copy)


def test_manifest_id_mismatch(bundle_copy: Path) -> None:
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["bundle_id"] = "b-0000000000000000"
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="bundle id mismatch.*b-0000000000000000"):
        load_bundle(bundle_copy)


def test_manifest_hash_edited(bundle_copy: Path) -> None:
    """Editing a hash without re-deriving the id is caught by the id check."""
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"]["tokenizer.json"] = "0" * 64
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"files\.tokenizer\.json changed"):
        load_bundle(bundle_copy)


def test_manifest_lacks_a_stage(bundle_copy: Path) -> None:
    m = json.loads((bundle_copy / "manifest.json").read_text())
    del m["files"]["vision/block_02.onnx"]
    m = seal(m)
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"does not list required files: vision/block_02\.onnx"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"bundle_id": "x"}', "malformed")],
)
def test_bad_manifest(bundle_copy: Path, content: str, match: str) -> None:
    (bundle_copy / "manifest.json").write_text(content)
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("logit_scale",), 1.0),
        (("vision", "num_blocks"), 2),
        (("text", "eos_token_id"), 3),
        (("model_name",), "x"),
    ],
)
def test_an_edited_manifest_field_is_named(bundle_copy: Path, path: tuple[str, ...], value: object) -> None:
    """The id covers the manifest's content, not only its files: logit_scale 21 -> 1 changes every answer."""
    m = json.loads((bundle_copy / "manifest.json").read_text())
    node = m
    for key in path[:-1]:
        node = node[key]
    assert node[path[-1]] != value
    node[path[-1]] = value
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=re.escape(f"field(s) {'.'.join(path)} changed")):
        load_bundle(bundle_copy)


def test_editing_a_field_and_its_digest_still_fails_on_the_id(bundle_copy: Path) -> None:
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["logit_scale"] = 1.0
    m["content_sha256"] = content_digests(m)
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="bundle id mismatch"):
        load_bundle(bundle_copy)


def test_a_rebuilt_bundle_with_other_content_gets_another_id(bundle_copy: Path) -> None:
    m = json.loads((bundle_copy / "manifest.json").read_text())
    fields = {k: v for k, v in m.items() if k not in ("files", "bundle_id", "content_sha256")}
    same = write_manifest(bundle_copy, fields)
    assert same.bundle_id == m["bundle_id"]  # the same content gives the same id
    changed = write_manifest(bundle_copy, {**fields, "logit_scale": fields["logit_scale"] / 2})
    assert changed.bundle_id != m["bundle_id"]
    assert load_bundle(bundle_copy).id == changed.bundle_id
