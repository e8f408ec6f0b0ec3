"""The disk archive: frames filed per channel and hour, compressed when finished, read
back by `module-ingest export`.

    format.py      the bytes and names of its files (specified in FORMAT.md)
    reader.py      reading it back, beside the running subscriber (export)
    live.py        a `.log` being written, and its index blocks
    state.py       archive.state, the checkpoint
    recovery.py    the in-memory state rebuilt from the files (start, failure)
    subscriber.py  ArchiveSubscriber: writing, compression, retention
"""

from appliance.subscribers.archive.subscriber import ArchiveSubscriber

# configs name the type "appliance.subscribers.archive:ArchiveSubscriber" as well as "archive"
__all__ = ["ArchiveSubscriber"]
