"""A small gRPC client of the cloud service, for tests and `splitclip bench cloud`.

It also builds frames the way an edge node would (stages[0:k] + codec.encode), using the shared
package only. The real edge client with fallback lives in edge_node/.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import grpc
import numpy as np
from numpy.typing import NDArray

from cloud_service.grpc_api import pb, pb_grpc
from splitclip import codec
from splitclip.constants import TOKEN_METADATA_KEY
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


def metadata(token: str | None) -> list[tuple[str, str]]:
    return [(TOKEN_METADATA_KEY, token)] if token else []


class FrameMaker:
    """Edge-side part of the split: image -> codec payload at cut k."""

    def __init__(self, runtime: BundleRuntime) -> None:
        self.runtime = runtime
        self.tower = Tower(runtime)
        self.spec = codec.TensorSpec.from_manifest(runtime.manifest)
        self.calibration = runtime.bundle.calibration()

    def tensor_at(self, image: NDArray[np.uint8], cut: int) -> np.ndarray:
        """The tensor an edge node sends at `cut` for one image (any size; resized and cropped here)."""
        return self.tower.at_cut(self.tower.model_input(image), cut)[0]

    def payload(self, image: NDArray[np.uint8], cut: int, preset: str = "lossless") -> bytes:
        x = self.tensor_at(image, cut)
        return codec.encode(x, cut=cut, spec=self.spec, preset=preset, calibration=self.calibration)

    def frame(
        self,
        image: NDArray[np.uint8],
        cut: int,
        prompts: Sequence[str] = (),
        *,
        frame_id: int = 0,
        preset: str = "lossless",
        node_id: str = "test-node",
        **fields: object,
    ) -> pb.Frame:
        return pb.Frame(
            node_id=node_id,
            frame_id=frame_id,
            bundle_id=self.runtime.manifest.bundle_id,
            cut=cut,
            codec=preset,
            payload=self.payload(image, cut, preset),
            prompts=list(prompts),
            **fields,  # type: ignore[arg-type]
        )


class CloudClient:
    """Blocking client over one channel."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.SplitClipStub(self.channel)
        self.md = metadata(token)
        self.timeout_s = timeout_s

    def classify(self, frame: pb.Frame) -> pb.Result:
        return self.stub.Classify(frame, metadata=self.md, timeout=self.timeout_s)

    def stream(self, frames: Iterable[pb.Frame]) -> Iterator[pb.Result]:
        return self.stub.ClassifyStream(iter(frames), metadata=self.md, timeout=self.timeout_s)

    def encode_text(self, request: pb.TextRequest) -> pb.TextResponse:
        return self.stub.EncodeText(request, metadata=self.md, timeout=self.timeout_s)

    def hello(self, request: pb.HelloRequest) -> pb.HelloResponse:
        return self.stub.Hello(request, metadata=self.md, timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def text_embeddings(resp: pb.TextResponse) -> NDArray[np.float32]:
    return np.frombuffer(resp.embeddings, dtype="<f4").reshape(-1, resp.dim)  # [n_labels, dim]
