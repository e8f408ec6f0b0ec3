"""The board edge: fingerprint, watchdog and sd_notify, board profiles."""
