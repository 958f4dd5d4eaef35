"""What every entry point's command line shares: one kind of usage error, and a parser
that reports bad flags as that error (one line, exit code 2) instead of argparse's
usage dump."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """Bad flags or inputs, found before any work; the CLI prints one line, exits 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)
