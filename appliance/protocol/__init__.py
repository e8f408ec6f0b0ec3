"""MIP/1 as a sans-IO codec and state machine: bytes in, events and bytes out."""
