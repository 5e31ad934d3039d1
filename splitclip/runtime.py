"""Inference over a bundle with ONNX Runtime only (used by the edge, its offline fallback and the cloud).

One ORT session per stage, created lazily; what a cut means lives in splitclip.tower, prompts in
splitclip.prompts. The vision stages take `edge="int8"` to run a bundle's int8 edge stages instead
(`Manifest.stage_file`: the int8 file where there is one, else the fp32 one).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from tokenizers import Tokenizer

from splitclip.bundle import Bundle, block_file, load_bundle
from splitclip.preprocess import PreprocessConfig


def make_session_options(threads: int | None = None, *, spinning: bool | None = None) -> ort.SessionOptions:
    """`threads`: intra-op threads (default SPLITCLIP_ORT_THREADS, 0 = ORT's choice). `spinning`: let idle
    worker threads busy-wait (default SPLITCLIP_ORT_SPIN, off; 1 turns it on). Off because ORT rarely has
    the cores to itself here: on a 2-core box a spinning pool starved everything that ran next to it or
    right after it (ViT-B/32 tower at batch 1: 61 ms spinning vs 34 ms not; the KLT codec's numpy matmul
    after the edge stages: 14.5 ms vs 0.2 ms, BLAS threads fighting the spinners; a Serve tail replica ran
    at a third of its speed beside the proxy). Only tiny models gain from it (the demo tower 1.03 -> 0.86 ms)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    n = threads if threads is not None else int(os.environ.get("SPLITCLIP_ORT_THREADS", "0"))
    if n > 0:
        opts.intra_op_num_threads = n
        opts.inter_op_num_threads = 1
    spin = spinning if spinning is not None else os.environ.get("SPLITCLIP_ORT_SPIN", "0") == "1"
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class TextTokenizer:
    """tokenizer.json -> int32 ids [batch, context_length], padded with pad id, truncated keeping eos."""

    def __init__(self, path: str, context_length: int, pad_id: int, eos_id: int) -> None:
        self.tok = Tokenizer.from_file(path)
        self.tok.no_padding()
        self.tok.no_truncation()
        self.context_length = context_length
        self.pad_id = pad_id
        self.eos_id = eos_id

    def __call__(self, prompts: Sequence[str]) -> NDArray[np.int32]:
        ids = np.full((len(prompts), self.context_length), self.pad_id, dtype=np.int32)
        for i, enc in enumerate(self.tok.encode_batch(list(prompts))):
            row = enc.ids[: self.context_length]
            if len(enc.ids) > self.context_length:
                row[-1] = self.eos_id  # keep pooling well-defined on truncated prompts
            ids[i, : len(row)] = row
        return ids


class BundleRuntime:
    """ONNX Runtime sessions over one bundle; sessions are created lazily, per stage."""

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        threads: int | None = None,
        spinning: bool | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(os.fspath(bundle))
        self.manifest = self.bundle.manifest
        self._opts = make_session_options(threads, spinning=spinning)
        self._providers = list(providers) if providers else ["CPUExecutionProvider"]
        self._sessions: dict[str, tuple[ort.InferenceSession, str]] = {}  # name -> (session, input name)

    # -- sessions ---------------------------------------------------------------------------
    def _entry(self, name: str) -> tuple[ort.InferenceSession, str]:
        entry = self._sessions.get(name)
        if entry is None:
            s = ort.InferenceSession(str(self.bundle.path(name)), self._opts, providers=self._providers)
            entry = self._sessions[name] = (s, s.get_inputs()[0].name)
        return entry

    def session(self, name: str) -> ort.InferenceSession:
        return self._entry(name)[0]

    def _run(self, name: str, x: np.ndarray) -> np.ndarray:
        s, input_name = self._entry(name)
        return s.run(None, {input_name: x})[0]

    def warmup(self, text: bool = True, int8: bool = False) -> None:
        """Create the sessions now: every fp32 stage, text.onnx if `text`, the int8 stages if `int8`."""
        for name in [*self.manifest.stage_files(), *(self.manifest.int8_files() if int8 else [])]:
            self.session(name)
        if text:
            self.session("text.onnx")

    # -- image side -------------------------------------------------------------------------
    @cached_property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.bundle.read_json("preprocess.json"))

    @property
    def num_blocks(self) -> int:
        return self.manifest.vision.num_blocks

    @property
    def has_int8(self) -> bool:
        return self.manifest.has_int8

    def embed(self, pixels: NDArray[np.float32], edge: str = "fp32") -> NDArray[np.float32]:
        return self._run(
            self.manifest.stage_file("vision/embed.onnx", edge), pixels
        )  # [batch, tokens, width]

    def run_blocks(
        self, hidden: NDArray[np.float32], start: int, stop: int, edge: str = "fp32"
    ) -> NDArray[np.float32]:
        for i in range(start, stop):
            hidden = self._run(
                self.manifest.stage_file(block_file(i), edge), hidden
            )  # [batch, tokens, width]
        return hidden

    def head(self, hidden: NDArray[np.float32], edge: str = "fp32") -> NDArray[np.float32]:
        return self._run(self.manifest.stage_file("vision/head.onnx", edge), hidden)  # [batch, embed_dim]

    # -- text side --------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> TextTokenizer:
        t = self.manifest.text
        return TextTokenizer(
            str(self.bundle.path("tokenizer.json")), t.context_length, t.pad_token_id, t.eos_token_id
        )

    def encode_text(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Texts (already validated and templated by splitclip.prompts) -> L2-normalised [n, embed_dim]."""
        return self._run("text.onnx", self.tokenizer(texts))  # ids: [n, context]
