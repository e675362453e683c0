"""The package version (one place; the package and the model sidecars read it)."""

__version__ = "0.1.0"
