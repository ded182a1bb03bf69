"""The one exception type of the data-preparation room (defined in `ettin.errors`, below the
tokenizer and the download cache, which raise it too)."""

from __future__ import annotations

from ettin.errors import PrepError

__all__ = ["PrepError"]
