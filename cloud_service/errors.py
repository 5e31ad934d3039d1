"""Errors that become gRPC statuses: each carries the status code, a message and a machine-readable kind.

A unary refusal is the status plus trailing metadata `x-splitclip-error: <kind>` when the kind is set;
a stream refusal is a `Result.error` with the same code name, message and kind (see `to_pb`).
"""

from __future__ import annotations

from typing import Any

import grpc

from cloud_service.grpc_api import pb
from splitclip.codec import CodecError, PayloadTooLarge
from splitclip.constants import ERROR_BUNDLE_MISMATCH, ERROR_IMAGE_UPLOAD_REFUSED, ERROR_KIND_METADATA_KEY
from splitclip.prompts import PromptError


class ServiceError(Exception):
    """A request the service refuses; `code` is the gRPC status the client sees, `kind` (may be "")
    says which refusal it is where the code alone is ambiguous (splitclip.constants.ERROR_*)."""

    def __init__(self, code: grpc.StatusCode, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (ServiceError, (self.code, self.message, self.kind))

    def to_pb(self) -> pb.Error:
        return pb.Error(code=self.code.name, message=self.message, kind=self.kind)


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def precondition(message: str, kind: str = "") -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message, kind)


def bundle_mismatch(node_bundle: str, cloud_bundle: str) -> ServiceError:
    return precondition(
        f"bundle mismatch: the node runs bundle {node_bundle or '(none)'}, the cloud runs bundle {cloud_bundle}",
        ERROR_BUNDLE_MISMATCH,
    )


def image_upload_refused() -> ServiceError:
    return precondition(
        "image upload refused: this cloud does not accept pixels (cut 0; SPLITCLIP_ALLOW_IMAGE_UPLOAD=0 "
        "here): send features from a cut >= 1",
        ERROR_IMAGE_UPLOAD_REFUSED,
    )


def unauthenticated(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message)


def too_large(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServiceError:
    """Something the call needs is down for now (the search store): the client may retry later."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


def internal(e: BaseException) -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


def from_exception(e: BaseException) -> ServiceError:
    """Map the shared package's validation errors onto statuses; anything else is INTERNAL."""
    if isinstance(e, ServiceError):
        return e
    if isinstance(e, PayloadTooLarge):
        return too_large(str(e))
    if isinstance(e, CodecError):
        return invalid(f"malformed frame: {e}")
    if isinstance(e, PromptError):
        return invalid(str(e))
    return internal(e)


def set_status(grpc_context: Any, e: ServiceError) -> None:
    """Code, details and (when the error has a kind) trailing metadata on a gRPC context."""
    if grpc_context is None:
        return
    grpc_context.set_code(e.code)
    grpc_context.set_details(e.message)
    if e.kind:
        grpc_context.set_trailing_metadata([(ERROR_KIND_METADATA_KEY, e.kind)])


def refuse(grpc_context: Any, e: ServiceError, empty: Any) -> Any:
    """Unary refusal: set the status on the context and return an empty message (Serve sends the
    code with it); without a gRPC context (a handle call) raise instead."""
    if grpc_context is None:
        raise e
    set_status(grpc_context, e)
    return empty
