"""Checkpoint I/O and declarative weight mappings (HF <-> mm)."""
