"""What every entry point's command line shares: one kind of usage error, and a parser
that reports bad flags as that error (one line, exit code 2) instead of argparse's
usage dump."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from batch_caption import quiet

T = TypeVar("T")


class UsageError(ValueError):
    """Bad flags or inputs, found before any work; the CLI prints one line, exits 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def one_line(e: BaseException) -> str:
    """The gist of an exception; a worker's failure arrives as a whole traceback text,
    whose last line names the real error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Traceback"):
        return lines[-1]
    return f"{type(e).__name__}: {lines[0]}"


def run_job(prog: str, work: Callable[[], T]) -> tuple[int, T | None]:
    """Runs an entry point's `work` -> (exit code, its result): 0 with the result, 2 for a
    UsageError (found before any work), 130 when interrupted, 1 when the job failed as a
    whole; each failure said in one line on stderr, the trace in the debug log."""
    logging.basicConfig(level=logging.WARNING, format=quiet.LOG_FORMAT)
    try:
        return 0, work()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130, None
    except Exception as e:  # noqa: BLE001 - the job failed as a whole: one line, the trace in the log
        logging.getLogger("batch_caption").debug("job failed", exc_info=True)
        print(f"{prog}: pipeline failed: {one_line(e)}", file=sys.stderr)
        return 1, None
