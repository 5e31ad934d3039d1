"""The model bundle: manifest.json plus the ONNX stages, tokenizer and configs it lists.

A bundle directory looks like this (names are relative to it):

    manifest.json            this file's `Manifest`
    vision/embed.onnx        pixels [batch, 3, H, W] -> hidden [batch, tokens, width]  (patchify + pos + pre-LN)
    vision/block_00.onnx     hidden -> hidden, one per encoder block (dynamic batch and token axes)
    vision/head.onnx         hidden -> normalised image embedding [batch, embed_dim]  (post-LN on CLS + proj)
    vision/int8/block_00.onnx  optional (`splitclip partition --edge-int8`): the block with int8 weights and
                             dynamically quantised activations, for the edge only (see partitioner.quantize)
    text.onnx                int32 ids [batch, context] -> normalised text embedding [batch, embed_dim]
    tokenizer.json           Hugging Face tokenizers file
    preprocess.json          resize / crop / mean / std (see splitclip.preprocess)
    calibration.npz          optional: per-cut PCA bases for the codec (see splitclip.codec)
    agreement.json           optional: measured agreement per plan (see splitclip.agreement)

The bundle id is a hash over the manifest's whole content (every field but the id itself, the sha256
of every listed file among them), so two bundles with the same id run the same numbers and score the
same way. The manifest also keeps a digest per field (`content_sha256`), so an edited field is named
when the bundle is loaded. Loading verifies every hash; nothing here imports torch or ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from splitclip.errors import SplitclipError

if TYPE_CHECKING:
    from splitclip.agreement import AgreementTable
    from splitclip.codec import Calibration

BUNDLE_FORMAT = 2  # 2: the id covers the manifest content, not only the files
MANIFEST_NAME = "manifest.json"
CALIBRATION_FILE = "calibration.npz"


class BundleError(SplitclipError, ValueError):
    """A bundle is missing, tampered with, or does not match its manifest."""


@dataclass(frozen=True)
class VisionSpec:
    image_size: int  # input side in pixels (square, after resize + centre crop)
    patch_size: int
    num_blocks: int  # L: cuts run from 0 to L
    width: int  # hidden size of the residual stream
    num_tokens: int  # 1 (CLS) + (image_size / patch_size) ** 2


@dataclass(frozen=True)
class TextSpec:
    context_length: int  # ids are padded / truncated to this length
    vocab_size: int
    width: int
    eos_token_id: int  # pooling takes the first position holding this id
    pad_token_id: int


@dataclass(frozen=True)
class Manifest:
    bundle_id: str
    model_name: str
    embed_dim: int
    logit_scale: float  # already exponentiated: scores are softmax(logit_scale * img @ txt.T)
    vision: VisionSpec
    text: TextSpec
    files: dict[str, str]  # relative path -> sha256
    format: int = BUNDLE_FORMAT
    extra: dict[str, object] = field(default_factory=dict)
    content_sha256: dict[str, str] = field(default_factory=dict)  # field path -> digest of its value

    @property
    def num_blocks(self) -> int:
        return self.vision.num_blocks

    def stage_files(self) -> list[str]:
        blocks = [block_file(i) for i in range(self.vision.num_blocks)]
        return ["vision/embed.onnx", *blocks, "vision/head.onnx"]

    def int8_files(self) -> list[str]:
        """The int8 edge stages this bundle lists (empty: it has none), in stage order."""
        return [f for f in map(int8_file, self.stage_files()) if f in self.files]

    @property
    def has_int8(self) -> bool:
        return bool(self.int8_files())

    def stage_file(self, name: str, edge: str = "fp32") -> str:
        """The file that runs stage `name` (a `stage_files()` entry) for `edge` stages: with "int8", its int8
        version where the bundle has one (stages without one, e.g. the embed, run fp32)."""
        if edge == "fp32":
            return name
        if edge != "int8":
            raise BundleError(f"edge stages must be 'fp32' or 'int8', got {edge!r}")
        if not self.has_int8:
            raise BundleError("this bundle has no int8 edge stages: partition it with --edge-int8")
        q = int8_file(name)
        return q if q in self.files else name

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_dict(data: dict) -> Manifest:
        try:
            return Manifest(
                bundle_id=str(data["bundle_id"]),
                model_name=str(data["model_name"]),
                embed_dim=int(data["embed_dim"]),
                logit_scale=float(data["logit_scale"]),
                vision=VisionSpec(**data["vision"]),
                text=TextSpec(**data["text"]),
                files={str(k): str(v) for k, v in data["files"].items()},
                format=int(data.get("format", BUNDLE_FORMAT)),
                extra=dict(data.get("extra", {})),
                content_sha256={str(k): str(v) for k, v in data.get("content_sha256", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest.json is malformed: {e!r}") from e


def block_file(i: int) -> str:
    return f"vision/block_{i:02d}.onnx"


INT8_DIR = "vision/int8"


def int8_file(name: str) -> str:
    """Where the int8 version of stage `name` lives: vision/block_00.onnx -> vision/int8/block_00.onnx."""
    return f"{INT8_DIR}/{name.rsplit('/', 1)[-1]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_NOT_CONTENT = ("bundle_id", "content_sha256")


def content_digests(data: dict) -> dict[str, str]:
    """A digest per leaf field of a manifest dict ("logit_scale", "vision.num_blocks",
    "files.text.onnx", ...), everything but the id and these digests themselves."""
    out: dict[str, str] = {}

    def walk(path: list[str], value: object) -> None:
        if isinstance(value, dict) and value:
            for k in sorted(value):
                walk([*path, str(k)], value[k])
            return
        body = json.dumps([path, value], sort_keys=True, separators=(",", ":"))
        out[".".join(path)] = hashlib.sha256(body.encode()).hexdigest()[:16]

    for k in sorted(data):
        if k not in _NOT_CONTENT:
            walk([k], data[k])
    return out


def bundle_id_of(data: dict) -> str:
    """Bundle id: a short hash over the per-field digests of the manifest's content."""
    h = hashlib.sha256()
    for name, digest in sorted(content_digests(data).items()):
        h.update(f"{name}\0{digest}\n".encode())
    return "b-" + h.hexdigest()[:16]


def seal(data: dict) -> dict:
    """The manifest dict with its per-field digests and id filled in from its content."""
    body = {k: v for k, v in data.items() if k not in _NOT_CONTENT}
    return {**body, "content_sha256": content_digests(body), "bundle_id": bundle_id_of(body)}


def _check_content(data: dict, where: Path) -> None:
    """Name the fields whose value no longer matches its digest, then check the id itself."""
    stored = data.get("content_sha256")
    if not isinstance(stored, dict):
        raise BundleError(f"{where}: content_sha256 is missing; re-run `splitclip partition`")
    actual = content_digests(data)
    changed = sorted(k for k in stored.keys() | actual.keys() if stored.get(k) != actual.get(k))
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise BundleError(
            f"{where}: field(s) {shown} changed after the bundle was built (their digests differ); "
            "rebuild it with `splitclip partition`"
        )
    derived = bundle_id_of(data)
    if derived != data.get("bundle_id"):
        raise BundleError(
            f"bundle id mismatch in {where}: manifest says {data.get('bundle_id')}, its content gives {derived}"
        )


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    @property
    def id(self) -> str:
        return self.manifest.bundle_id

    def path(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise BundleError(f"bundle {self.root} has no file {name!r} in its manifest")
        return self.root / name

    def has(self, name: str) -> bool:
        return name in self.manifest.files

    def read_json(self, name: str) -> dict:
        return json.loads(self.path(name).read_text())

    @property
    def has_calibration(self) -> bool:
        return self.has(CALIBRATION_FILE)

    def agreement(self) -> AgreementTable | None:
        """The measured agreement per plan (agreement.json), or None when the bundle has none."""
        from splitclip.agreement import AGREEMENT_FILE, AgreementTable

        return AgreementTable.load(self.path(AGREEMENT_FILE)) if self.has(AGREEMENT_FILE) else None

    def calibration(self) -> Calibration | None:
        """The codec calibration (per-cut PCA bases, calibration.npz), or None when the bundle has none."""
        from splitclip.codec import Calibration

        return Calibration.load(self.path(CALIBRATION_FILE)) if self.has(CALIBRATION_FILE) else None


REQUIRED_FILES = ("vision/embed.onnx", "vision/head.onnx", "text.onnx", "tokenizer.json", "preprocess.json")


def write_manifest(root: Path, manifest_fields: dict) -> Manifest:
    """Hash every file under `root` (except the manifest), derive the id and write manifest.json."""
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = Manifest.from_dict(seal({**manifest_fields, "format": BUNDLE_FORMAT, "files": files}))
    (root / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def load_bundle(root: str | Path, *, verify: bool = True) -> Bundle:
    """Load and (by default) hash-verify a bundle. Any problem is a `BundleError` naming the file."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{root} is not a splitclip bundle: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BundleError(f"{mpath} must hold a JSON object")
    manifest = Manifest.from_dict(data)
    if manifest.format != BUNDLE_FORMAT:
        raise BundleError(
            f"bundle format {manifest.format} is not supported (expected {BUNDLE_FORMAT}): "
            "rebuild the bundle with `splitclip partition`"
        )
    _check_content(data, mpath)
    expected = set(REQUIRED_FILES) | set(manifest.stage_files())
    missing_in_manifest = sorted(expected - set(manifest.files))
    if missing_in_manifest:
        raise BundleError(
            f"manifest of {root} does not list required files: {', '.join(missing_in_manifest)}"
        )
    int8 = manifest.int8_files()
    missing_int8 = [
        int8_file(block_file(i)) for i in range(manifest.num_blocks) if int8_file(block_file(i)) not in int8
    ]
    if int8 and missing_int8:
        raise BundleError(f"manifest of {root} lists int8 edge stages but not {', '.join(missing_int8)}")
    if verify:
        for name, digest in sorted(manifest.files.items()):
            p = root / name
            if not p.is_file():
                raise BundleError(f"bundle file {name} is missing from {root}")
            actual = sha256_file(p)
            if actual != digest:
                raise BundleError(
                    f"bundle file {name} is tampered or corrupt: sha256 {actual[:12]}… != manifest {digest[:12]}…"
                )
    return Bundle(root=root, manifest=manifest)
