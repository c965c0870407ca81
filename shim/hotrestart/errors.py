"""The project's one exception hierarchy and its single mapping to wire status codes.

Every layer raises these (or lets foreign exceptions through); only `status_for` turns an
exception into a ttrpc/gRPC status, so an error means the same thing whichever call it
surfaces from. containerd's errdefs understands NotFound, AlreadyExists, InvalidArgument,
FailedPrecondition, Unavailable, Unimplemented, Canceled and DeadlineExceeded; anything else
becomes "unknown" on its side, so we pick from that set where we can.
"""

from __future__ import annotations

import asyncio
import enum


class Code(enum.IntEnum):
    """gRPC status codes (ttrpc reuses them)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ShimError(Exception):
    """Base of every error the shim raises on purpose."""

    code: Code = Code.UNKNOWN


class NotFoundError(ShimError):
    code = Code.NOT_FOUND


class AlreadyExistsError(ShimError):
    code = Code.ALREADY_EXISTS


class InvalidArgumentError(ShimError):
    code = Code.INVALID_ARGUMENT


class UnimplementedError(ShimError):
    """A service or method this shim does not serve."""

    code = Code.UNIMPLEMENTED


class FailedPreconditionError(ShimError):
    code = Code.FAILED_PRECONDITION


class InvalidTransitionError(FailedPreconditionError):
    """A call that the container's current state does not allow."""

    def __init__(self, state: str, action: str) -> None:
        super().__init__(f"invalid state transition: cannot {action} a container that is {state}")
        self.state = state
        self.action = action


class CheckpointError(ShimError):
    """A checkpoint could not be taken; nothing was published and the container is as it was."""

    code = Code.UNKNOWN


class FilesError(ShimError):
    """A container's saved files could not be captured or replayed (unsafe or malformed)."""

    code = Code.FAILED_PRECONDITION


class ArchiveRestoreError(ShimError):
    """Checkpoint images given at create (a CRI checkpoint archive) are refused: restoring
    from archives is off on this node, or the images are not attested, or fail a check."""

    # The node's configuration or the archive must change; the pod's create fails with why.
    code = Code.FAILED_PRECONDITION


class StoreError(ShimError):
    """The checkpoint store, or something in it, cannot be used as asked: a stored file or
    manifest that does not check out, a key that cannot be loaded or does not authenticate,
    an entry that is not what the store writes. Each kind is defined beside the code that
    raises it (store/archive.py, manifest.py, seal.py, safefs.py)."""

    # The store's content or configuration (a damaged checkpoint, a missing key, a planted
    # link) must change before the call can succeed; retrying as is would not help.
    # DATA_LOSS would describe damage too, but containerd's errdefs know FailedPrecondition
    # and would report DATA_LOSS as "unknown".
    code = Code.FAILED_PRECONDITION


class ContainerdAPIError(ShimError):
    """containerd's own API did not give what was asked (unreachable, no answer in time, no
    such container, an answer over our caps); the message says which."""

    code = Code.UNAVAILABLE


class RuntimeCommandError(ShimError):
    """An external command (runc, CRIU) failed; `message` carries its own last words."""

    code = Code.UNKNOWN

    def __init__(self, argv: list[str], returncode: int, detail: str, verb: str = "") -> None:
        name = argv[0].rsplit("/", 1)[-1] if argv else "command"
        what = f"{name} {verb}" if verb else name
        super().__init__(f"{what} failed (exit {returncode}): {detail}".rstrip(": "))
        self.argv = argv
        self.returncode = returncode
        self.detail = detail
        self.verb = verb


def status_for(exc: BaseException) -> tuple[Code, str]:
    """Map any exception to the (code, message) sent on the wire. The only such mapping."""
    if isinstance(exc, ShimError):
        return exc.code, str(exc)
    if isinstance(exc, asyncio.CancelledError):
        return Code.CANCELLED, "cancelled"
    if isinstance(exc, TimeoutError):
        return Code.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    if isinstance(exc, FileNotFoundError):
        return Code.NOT_FOUND, str(exc)
    if isinstance(exc, PermissionError):
        return Code.PERMISSION_DENIED, str(exc)
    if isinstance(exc, NotImplementedError):
        return Code.UNIMPLEMENTED, str(exc) or "not implemented"
    return Code.UNKNOWN, f"{type(exc).__name__}: {exc}"
