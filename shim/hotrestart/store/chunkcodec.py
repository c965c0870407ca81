"""A chunk's name and stored form: a BLAKE3 digest of its bytes, a zstd frame, sealed with a key.

Chunks are content-addressed: a chunk is named by the digest of its raw bytes, so a chunk
already in the store is recognised before it is compressed, and is written once however
many checkpoints (of one container or of many) hold it. BLAKE3 because naming every chunk
means hashing all of a container's memory at every checkpoint: it runs at 4 GB/s on one
core here (sha256: 1.3 GB/s), releases the GIL, and has a keyed mode. With a store key the
digest is keyed (`seal.ChunkKeys`), so a name says nothing about the bytes to whoever
reads the store without the key, and the frame is sealed with AES-256-GCM.

Every chunk read back is checked before its bytes are used: opened (with a key), then
decompressed into exactly its declared size, then hashed again and compared with its name.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from hotrestart.errors import StoreError
from hotrestart.store.seal import TAG_BYTES, ChunkKeys, SealError

LEVEL = -1  # zstd's fast mode: memory pages compress about as well as at level 3, twice as fast
PLAIN_SPACE = "plain"  # where the chunks of a store without a key live
DIGEST_HEX = 64


class IntegrityError(StoreError):
    """A stored chunk or file does not match what its manifest says."""


class CorruptChunk(IntegrityError):
    """A stored chunk is bad whatever refers to it: it does not open with its key, or its
    bytes, of exactly the declared size, do not hash to its name."""

    def __init__(self, digest: str, why: str) -> None:
        super().__init__(f"chunk {digest[:16]}: {why}")
        self.digest = digest


class Codec:
    """Names, encodes and decodes chunks; one per store key (or none), shared by threads."""

    def __init__(self, keys: ChunkKeys | None = None, *, level: int = LEVEL) -> None:
        self.keys = keys
        self.space = keys.space if keys is not None else PLAIN_SPACE
        self._level = level
        self._local = threading.local()

    def digest(self, raw: bytes | memoryview) -> str:
        """The chunk's name: its BLAKE3 digest, keyed when the store has a key."""
        h = blake3.blake3(key=self.keys.name_key) if self.keys is not None else blake3.blake3()
        h.update(raw)
        return h.hexdigest()

    def encode(self, digest: str, raw: bytes | memoryview) -> bytes:
        """The chunk as stored: its zstd frame, sealed under its name with a key."""
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self._level)
        frame = cctx.compress(raw)
        if self.keys is None:
            return frame
        out = bytearray(len(frame) + TAG_BYTES)
        self.keys.seal_into(bytes.fromhex(digest), frame, out)
        return bytes(out)

    def decode_into(self, digest: str, stored: bytes, out: memoryview) -> None:
        """Check a stored chunk and write its raw bytes into `out`, which it must fill exactly."""
        frame: bytes | memoryview = stored
        scratch: bytearray | None = None
        if self.keys is not None:
            scratch = self._scratch(len(stored))
            try:
                n = self.keys.open_into(bytes.fromhex(digest), stored, scratch)
            except SealError as exc:
                raise CorruptChunk(digest, str(exc)) from None
            frame = memoryview(scratch)[:n]
        try:
            _decompress_into(frame, out)
        finally:
            if isinstance(frame, memoryview):
                frame.release()
        if self.digest(out) != digest:
            raise CorruptChunk(digest, "its bytes do not match its name")

    def _scratch(self, size: int) -> bytearray:
        # Reused per thread: a fresh multi-megabyte buffer costs more in page faults than the cipher.
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = bytearray(size)
        return buf


def _decompress_into(frame: bytes | memoryview, out: memoryview) -> None:
    """Decompress a frame into `out`, which must come out exactly full. `out` is the chunk's
    declared size: readinto cannot write past it, and one byte more is asked for only to
    tell an overlong frame. zstd's window is capped to the output, so a frame cannot make
    the decompressor allocate more than a chunk."""
    done = 0
    try:
        window = max(1 << 10, 1 << (max(len(out), 1) - 1).bit_length())
        with zstandard.ZstdDecompressor(max_window_size=max(window, 1 << 20)).stream_reader(frame) as reader:
            while done < len(out):
                with out[done:] as rest:
                    n = reader.readinto(rest)
                if not n:
                    break
                done += n
            if done == len(out) and reader.read(1):
                raise IntegrityError(f"a chunk decompressed to more than {len(out)} bytes")
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"a chunk is not valid zstd data: {exc}") from exc
    if done != len(out):
        raise IntegrityError(f"a chunk decompressed to {done} bytes, not {len(out)}")
