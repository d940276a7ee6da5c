"""The single version string; setup.py injects it into the native build."""

__version__ = "0.1.0"
