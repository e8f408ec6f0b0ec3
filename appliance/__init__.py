"""module-ingest: the ingestion daemon for edge boards."""

__version__ = "0.1.0"
