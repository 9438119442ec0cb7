"""The project's error type: every failure a user can act on derives from it, so the CLI
recognises them all without importing the rooms that raise them."""

from __future__ import annotations

__all__ = ["SendtimeError"]


class SendtimeError(Exception):
    """A failure with a message the user can act on (bad input, missing model, refused gate)."""
