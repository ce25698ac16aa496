"""The installed mmzoo version (``0.0.0`` when running from a source tree that is not installed)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmzoo")
except PackageNotFoundError:
    __version__ = "0.0.0"
