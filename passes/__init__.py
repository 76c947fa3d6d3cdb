"""Rewrite passes, one module per method. Importing this package registers them."""

from passes.registry import METHODS

__all__ = ["METHODS"]
