"""Every cap the ttrpc server puts on a peer, in one place.

containerd sends a handful of small requests at a time with a few metadata entries, so these
sit far above its needs and far below what would hurt the shim. Worst case, all connections
hostile: MAX_CONNECTIONS x (MAX_INFLIGHT_BYTES of requests held by handlers, their replies,
one frame being read) -- about 1.3 GiB if every one of them were full, against no bound at all
before; in practice a peer that stops reading holds MAX_INFLIGHT small replies and stalls.
"""

from __future__ import annotations

import dataclasses

# ttrpc's own limit (messageLengthMax in containerd/ttrpc); a bigger frame is read past
# and answered ResourceExhausted.
MAX_PAYLOAD = 4 << 20

# Open connections; a further one is closed at once. containerd holds one per shim.
MAX_CONNECTIONS = 64

# Requests read and not yet answered, per connection; at either cap the server stops reading
# that connection until a reply goes out, so a peer that never reads its replies stalls
# itself instead of growing the shim.
MAX_INFLIGHT = 128
MAX_INFLIGHT_BYTES = 16 << 20

# Metadata of one request; over either cap the request is InvalidArgument.
MAX_METADATA_ENTRIES = 1024
MAX_METADATA_BYTES = 64 << 10

# Seconds from a frame's first byte to its last (slowloris). containerd writes a frame in one
# go; between frames there is no timeout at all (see server.py).
FRAME_TIMEOUT = 60.0

# Seconds a closing connection may take to flush its replies before it is cut off.
CLOSE_LINGER = 2.0

# Reply bytes queued in the transport before a writer waits for the peer to read.
WRITE_HIGH_WATER = 64 << 10


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """The caps one server applies; tests shrink them, the shim uses the defaults."""

    max_connections: int = MAX_CONNECTIONS
    max_inflight: int = MAX_INFLIGHT
    max_inflight_bytes: int = MAX_INFLIGHT_BYTES
    max_metadata_entries: int = MAX_METADATA_ENTRIES
    max_metadata_bytes: int = MAX_METADATA_BYTES
    frame_timeout: float = FRAME_TIMEOUT
    write_high_water: int = WRITE_HIGH_WATER
    close_linger: float = CLOSE_LINGER
