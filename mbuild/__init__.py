"""mbuild: Make for model merging."""

__version__ = "0.1.0"
