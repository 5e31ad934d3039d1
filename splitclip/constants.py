"""Constants both sides agree on: metadata keys, CLIP's pixel statistics, defaults, the version."""

from __future__ import annotations

from importlib import metadata

# gRPC metadata: the node's bearer token, and the machine-readable kind of an error status.
TOKEN_METADATA_KEY = "x-splitclip-token"
ERROR_KIND_METADATA_KEY = "x-splitclip-error"

# Values of ERROR_KIND_METADATA_KEY (trailing metadata on a failed call) and of Result.error.kind.
ERROR_BUNDLE_MISMATCH = "bundle-mismatch"
ERROR_IMAGE_UPLOAD_REFUSED = "image-upload-refused"  # the cloud does not take pixels (cut 0)

# OpenAI CLIP's image normalisation, the default when a checkpoint's preprocessor config is silent.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_TOP_K = 5

# Fleet search limits both sides keep (the cloud refuses beyond them; a node keeps its journal within
# them, so that an entry the cloud would refuse cannot block the upload of those behind it).
SEARCH_MAX_K = 1000  # hits per Search
UPLOAD_MAX_FRAMES = 4096  # frames per Upload call
INDEX_MAX_LABELS = 32  # top labels stored with a frame
INDEX_MAX_TEXT_CHARS = 300  # a node id, source or label stored with a frame (no NUL characters)


def package_version() -> str:
    try:
        return metadata.version("splitclip")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


VERSION = package_version()
