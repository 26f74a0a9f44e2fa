"""ELF: Embedded Language Flows — a reproducible pipeline (see README.md)."""

__version__ = "0.1.0"
