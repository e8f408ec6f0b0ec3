"""Subscribers: consumers of the durable log, each in its own process with its own cursor."""
