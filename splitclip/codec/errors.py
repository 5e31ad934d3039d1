"""The codec's errors: what a malformed payload, or an input that cannot be encoded, raises."""

from __future__ import annotations

from splitclip.errors import SplitclipError


class CodecError(SplitclipError, ValueError):
    """A payload (or an input to encode) is malformed; the message names the field and what was expected."""


class PayloadTooLarge(CodecError):
    """The payload is larger than `Limits.max_payload_bytes`."""
