"""Ops-Core: explicit state machines and a hash-chained audit log for fleets of AI agents."""

__version__ = "0.1.0"

__all__ = ["__version__"]
