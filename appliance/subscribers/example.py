"""A complete subscriber in a dozen lines, and a useful tap: every record as a JSON
line in `state_dir/records.jsonl`, appended and fsynced in flush (a line torn by a
crash is cut before the next append, and its batch comes again).

    [subscribers.tap]
    type = "appliance.subscribers.example:JsonlFile"
    channels = [1]
"""

from __future__ import annotations

from appliance.store.segment import Record, json_line, record_json
from appliance.store.worker import append_lines
from appliance.subscribers.base import Context, Subscriber


class JsonlFile(Subscriber):
    OPTIONS = {}  # no options of its own: any other key in its table is refused

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.path = context.state_dir / "records.jsonl"
        self.lines: list[str] = []

    def handle(self, records: list[Record]) -> None:
        self.lines += (json_line(record_json(rec)) for rec in records)

    def flush(self) -> None:
        if self.lines:
            append_lines(self.path, "".join(self.lines).encode())
            self.lines = []
