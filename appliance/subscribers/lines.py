"""Frames as JSON lines with the keys of `module-ingest dump`, built fast (no dict per
frame): what the cloud uploader's objects and the MQTT uplink's `payload = "json"` hold.

    {"id": "m-1/core-0", "channel": 7, "seq": 1, "ts_ns": 0, "recv_ns": 0, "payload_b64": "..."}
"""

from __future__ import annotations

import base64
import json

from appliance.store.segment import Record

LINE = b'{"id": %s, "channel": %d, "seq": %d, "ts_ns": %d, "recv_ns": %d, "payload_b64": "%s"}\n'
IDS_MAX = 4096  # identities whose JSON string is kept: a few identities, many frames
_ids: dict[str, bytes] = {}


def frame_line(rec: Record) -> bytes:
    """One frame as a JSON line, newline included."""
    ident = _ids.get(rec.identity)
    if ident is None:
        if len(_ids) >= IDS_MAX:
            _ids.clear()
        ident = _ids[rec.identity] = json.dumps(rec.identity).encode()
    payload = base64.b64encode(rec.payload)
    return LINE % (ident, rec.channel, rec.seq, rec.ts_ns, rec.recv_ns, payload)
