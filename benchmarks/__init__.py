"""Benchmarks of lcx; each module runs as a script (`python benchmarks/<name>.py`)."""
