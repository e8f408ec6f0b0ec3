"""A complete subscriber in a dozen lines, and a useful tap: every record as a JSON
line in `state_dir/records.jsonl` (fsynced in flush).

    [subscribers.tap]
    type = "appliance.subscribers.example:JsonlFile"
    channels = [1]
"""

from __future__ import annotations

import json
import os

from appliance.store.segment import Record
from appliance.store.tools import record_json
from appliance.subscribers.base import Context, Subscriber


class JsonlFile(Subscriber):
    OPTIONS = {}  # no options of its own: any other key in its table is refused

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
        fd = os.open(context.state_dir / "records.jsonl", flags, 0o600)
        self.file = os.fdopen(fd, "a", encoding="utf-8")

    def handle(self, records: list[Record]) -> None:
        for rec in records:
            self.file.write(json.dumps(record_json(rec)) + "\n")

    def flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
