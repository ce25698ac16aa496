"""Fixtures shared by the core tests (helpers live in extras_family.py and throwaway_plugin.py)."""

from extras_family import extras_fixture
from plain_family import plain_fixture

__all__ = ["extras_fixture", "plain_fixture"]
