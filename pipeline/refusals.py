"""Start-up refusals of the stage entry points as one clear line and exit status 1, never a traceback.

A refusal is bad input (a store built for other settings, a missing store or teacher, a config the
store cannot serve): the message already names the value and the fix, so a traceback only hides it.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from cache import NotAFeatureStoreError, StoreEntryError, StoreMismatchError
from cache.lock import StoreLockedError

# What `make cache-teacher` users type to rebuild; the library's own message names overwrite=True.
REBUILD_HINT = ("Rebuild it with --overwrite (make cache-teacher OVERWRITE=1), or set DISTILL.CACHE.PATH to another "
                "path for these settings.")
STORE_REFUSALS = (StoreMismatchError, StoreEntryError, NotAFeatureStoreError, StoreLockedError, FileNotFoundError)


def cli_message(error: BaseException) -> str:
    """The refusal's message as a command-line user needs it (CLI flags, not Python arguments)."""
    if isinstance(error, StoreMismatchError) and error.path is not None:
        return str(StoreMismatchError(error.path, error.differences, hint=REBUILD_HINT))
    if isinstance(error, KeyError) and error.args:  # StoreEntryError: KeyError's str() quotes its message
        return str(error.args[0])
    return str(error)


@contextmanager
def refusals_as_one_line(command: str, refusals: tuple[type[BaseException], ...] = STORE_REFUSALS) -> Iterator[None]:
    """Turn the given refusals raised in the block into `<command>: <message>` on stderr and exit 1."""
    try:
        yield
    except refusals as error:
        print(f"{command}: {cli_message(error)}", file=sys.stderr)
        raise SystemExit(1) from None
