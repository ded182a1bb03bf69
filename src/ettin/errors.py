"""How every entry point reports a user's mistake: one line that says what and what to do.

Our errors (ConfigError, DataError, CheckpointError, PrepError, ...) are ValueErrors whose
message names the problem and the fix; a traceback would bury that. `--debug` on the command
line, or ETTIN_DEBUG=1, shows the traceback instead. Used by `ettin` (cli.py) and by the
training entry (`python src/main.py`, `composer src/main.py`), so both print the same line.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

USER_ERRORS = (ValueError, FileNotFoundError)


def debugging(argv: list[str] | None = None) -> bool:
    """`--debug` in `argv` or ETTIN_DEBUG set (not 0/false/no): show tracebacks."""
    flag = os.environ.get("ETTIN_DEBUG", "").strip().lower()
    return (argv is not None and "--debug" in argv) or flag not in ("", "0", "false", "no")


@contextlib.contextmanager
def one_line_errors(prog: str, debug: bool) -> Iterator[None]:
    """Turn a user error raised inside into `<prog>: error: <message>` and exit status 2."""
    try:
        yield
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class PrepError(ValueError):
    """A problem with prep inputs (mixture file, source, tokenizer, a download) that the user must fix.

    The message always names the file or source concerned and says what to do. Defined here,
    below every room, because the tokenizer (`ettin.tokenizer`) and the download cache
    (`ettin.cache`) raise it as well as `ettin.prep`.
    """
