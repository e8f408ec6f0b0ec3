"""The serial diagnostics console: a sans-IO shell and the serial port that runs it."""
