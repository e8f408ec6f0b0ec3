"""A subscriber plug-in whose every batch fails: what the runner does with failures."""

from appliance.subscribers.base import Subscriber


class Failing(Subscriber):
    OPTIONS = {}

    def handle(self, records) -> None:
        raise RuntimeError("boom on purpose")
