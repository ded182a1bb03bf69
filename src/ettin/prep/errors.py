"""The one exception type of the data-preparation room."""

from __future__ import annotations


class PrepError(ValueError):
    """A problem with prep inputs (mixture file, source, tokenizer) that the user must fix.

    The message always names the file or source concerned and says what to do.
    """
