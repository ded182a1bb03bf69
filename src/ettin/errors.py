"""The errors ettin raises on purpose, and how every entry point reports the user's ones.

`EttinError` is the base of every error ettin defines. `UserError` is a mistake the user can fix
(a bad config value, a missing file, a checkpoint of another size, unreachable data, ...): its
message names the problem and the fix, and `one_line_errors` prints it as one line with exit
status 2. Each room raises its own subclass:

- `ConfigError` (ettin.config): a run configuration or recipe that cannot be used as written;
- `UsageError` (here): a command line that cannot be run as written;
- `PrepError` (here: the tokenizer and the download cache raise it as well as ettin.prep);
- `DataError` (ettin.data.shards), `RemoteError` (ettin.data.remote): data that cannot be used;
- `CheckpointError` (here: checkpoint.py, interop/ and eval/ raise it),
  `ReferenceFormatError` (ettin.interop.reference): checkpoints and models that cannot be read
  or used as asked;
- `LossSpikeError` (ettin.callbacks.loss_spike): the guard stopped the run (what to do next).

Anything else (a plain ValueError, a KeyError, an assertion) is a bug in ettin and propagates
with its traceback and exit status 1, so it looks like what it is. `--debug` on the command line,
or ETTIN_DEBUG=1, shows the traceback of a user error too. Used by `ettin` (cli.py) and by the
training entry (`python src/main.py`, `composer src/main.py`), so both print the same line.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


class EttinError(Exception):
    """Base of every error ettin defines (catch it to handle any of them)."""


class UserError(EttinError, ValueError):
    """A mistake the user can fix; the message names the problem and what to do.

    Also a ValueError (a value the user gave is wrong), so code that catches ValueError around
    a parser or a check keeps working.
    """


class UsageError(UserError):
    """A command line that cannot be run as written (a missing argument, a bad task name)."""


class PrepError(UserError):
    """A problem with prep inputs (mixture file, source, tokenizer, a download) that the user must fix.

    The message always names the file or source concerned and says what to do. Defined here,
    below every room, because the tokenizer (`ettin.tokenizer`) and the download cache
    (`ettin.cache`) raise it as well as `ettin.prep`.
    """


class CheckpointError(UserError):
    """A checkpoint or model that cannot be read or used for the requested model.

    Defined here, below every room, because `ettin.checkpoint`, the formats (`ettin.interop`) and
    the evaluation (`ettin.eval`, which must not import Composer) raise it.
    """


def debugging(argv: list[str] | None = None) -> bool:
    """`--debug` in `argv` or ETTIN_DEBUG set (not 0/false/no): show tracebacks."""
    flag = os.environ.get("ETTIN_DEBUG", "").strip().lower()
    return (argv is not None and "--debug" in argv) or flag not in ("", "0", "false", "no")


@contextlib.contextmanager
def one_line_errors(prog: str, debug: bool) -> Iterator[None]:
    """Turn a `UserError` raised inside into `<prog>: error: <message>` and exit status 2.

    Only user errors: any other exception is a bug and keeps its traceback (exit status 1).
    """
    try:
        yield
    except UserError as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
