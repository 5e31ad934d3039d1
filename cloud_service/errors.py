"""Errors that become gRPC statuses: each carries the status code and a message for the client."""

from __future__ import annotations

import grpc

from splitclip.codec import CodecError, PayloadTooLarge
from splitclip.prompts import PromptError


class ServiceError(Exception):
    """A request the service refuses; `code` is the gRPC status the client sees."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (ServiceError, (self.code, self.message))


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def precondition(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message)


def unauthenticated(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message)


def too_large(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


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
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
