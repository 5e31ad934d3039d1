"""Int8 edge stages (`splitclip partition --edge-int8`): every encoder block quantised with onnxruntime.quantization.

Each `vision/block_NN.onnx` gets a `vision/int8/block_NN.onnx` beside it: `quantize_dynamic`, int8
weights (per tensor, signed) and activations quantised per tensor at run time (MatMulInteger), so no
calibration images are needed and the token axis stays dynamic. Only the edge runs them; the cloud
always finishes with the fp32 stages, and the tensor on the wire keeps its shape and dtype.

What stays fp32 and why (measured on this 2-core AVX2 box, batch 1, ORT 1.32):
    embed    its patchify Conv becomes ConvInteger, which is slower than the fp32 Conv (ViT-B/32
             5.7 -> 15.8 ms, demo 0.21 -> 0.41 ms); quantising only its MatMuls changes nothing
    head     0.04-0.1 ms either way, and its error lands on the embedding itself
    blocks   ViT-B/32 13-19 -> 8 ms (about 2x), demo 0.6-0.75 -> 0.6 ms; relative error of one block's
             output 0.4 % (B/32) / 0.6 % (demo). Per-channel weights gave no better error on the demo
             (1.4 % vs 0.6 %) and no speed.
The files are deterministic (same fp32 graph, same bytes), so the bundle id stays reproducible.
"""

from __future__ import annotations

import logging
from pathlib import Path

from splitclip.bundle import block_file, int8_file

log = logging.getLogger("splitclip.partition")


def quantize_stage(src: Path, dst: Path) -> None:
    """One fp32 stage graph -> its int8 (dynamic) version."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "please consider pre-processing": it changes nothing for these graphs
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False)
    finally:
        root.setLevel(level)


def write_int8_stages(bundle_dir: Path, num_blocks: int) -> list[str]:
    """Write the int8 version of every block of the bundle being built in `bundle_dir`; their names."""
    names = []
    for i in range(num_blocks):
        name = int8_file(block_file(i))
        quantize_stage(bundle_dir / block_file(i), bundle_dir / name)
        names.append(name)
    log.info("int8 edge stages: %d blocks quantised (dynamic, int8 weights)", len(names))
    return names
