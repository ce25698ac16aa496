"""Fixtures shared by the core tests (helpers live in extras_family.py and throwaway_plugin.py)."""

from extras_family import extras

__all__ = ["extras"]
