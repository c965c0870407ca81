"""ttrpc frames: a 10-byte header (length, stream id, type, flags) and a protobuf payload.

Header layout (big-endian): uint32 payload length, uint32 stream id, uint8 type, uint8 flags.
Payloads above `limits.MAX_PAYLOAD` are refused; the reader discards such a payload so the
connection stays in step and the caller can answer ResourceExhausted on that stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import struct

from hotrestart.errors import Code, ShimError
from hotrestart.ttrpc import limits

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_PAYLOAD = limits.MAX_PAYLOAD
_DISCARD_CHUNK = 1 << 16


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class FrameError(ShimError):
    """The byte stream is broken; the connection cannot continue."""

    code = Code.UNAVAILABLE


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    payload: bytes
    # Set when the payload was over the limit and dropped; `payload` is then empty.
    oversize: int = 0


def encode(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"ttrpc payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), stream_id, mtype, flags) + payload


async def read_frame(reader: asyncio.StreamReader, frame_timeout: float | None = None) -> Frame | None:
    """Read one frame; None on a clean end of stream, FrameError on a torn or stalled one.

    Waiting for a frame to begin has no limit; once its first byte is in, the rest must
    follow within `frame_timeout` seconds.
    """
    first = await reader.read(HEADER_SIZE)
    if not first:
        return None
    try:
        async with asyncio.timeout(frame_timeout):
            return await _read_rest(reader, first)
    except TimeoutError as exc:
        raise FrameError(f"ttrpc frame not completed within {frame_timeout:g} s") from exc


async def _read_rest(reader: asyncio.StreamReader, first: bytes) -> Frame:
    try:
        header = first if len(first) == HEADER_SIZE else first + await reader.readexactly(HEADER_SIZE - len(first))
    except asyncio.IncompleteReadError as exc:
        got = len(first) + len(exc.partial)
        raise FrameError(f"truncated ttrpc header ({got} of {HEADER_SIZE} bytes)") from exc
    length, stream_id, mtype, flags = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        await _discard(reader, length)
        return Frame(stream_id, mtype, flags, b"", oversize=length)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"truncated ttrpc payload ({len(exc.partial)} of {length} bytes)") from exc
    return Frame(stream_id, mtype, flags, payload)


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    remaining = length
    while remaining:
        chunk = await reader.read(min(remaining, _DISCARD_CHUNK))
        if not chunk:
            raise FrameError(f"connection closed inside an oversize frame of {length} bytes")
        remaining -= len(chunk)
