"""The package version, in a module of its own so that any layer can read it without importing
the package root (whose lazy ``medattn.load`` forward points at the top-level API)."""

__version__ = "0.1.0"
