"""What every entry point's command line shares: one kind of usage error, and a parser
that reports bad flags as that error (one line, exit code 2) instead of argparse's
usage dump. An unknown flag is named as typed, with the nearest valid one
(`--beam-size` -> `--beam_size`, `--outptu` -> `--output`); the Beam entry points check
Beam's pipeline options the same way, before Beam would log and drop them."""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from batch_caption import quiet

T = TypeVar("T")


class UsageError(ValueError):
    """Bad flags or inputs, found before any work; the CLI prints one line, exits 2."""


def require(ok: bool, message: str) -> None:
    """Raises UsageError(message) unless `ok`: a config's flag checks, one line each."""
    if not ok:
        raise UsageError(message)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            raise unknown_arguments(extras, option_strings(self))
        return parsed


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every long flag `parser` knows."""
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def suggest(flag: str, known: Sequence[str]) -> str | None:
    """The valid flag nearest to `flag` as typed: the same name with '_' for '-' (or the
    reverse, for --no-x switches), else the closest by difflib; None when nothing is close."""
    name = flag.lstrip("-")
    for spelled in ("--" + name.replace("-", "_"), "--" + name.replace("_", "-")):
        if spelled in known:
            return spelled
    close = difflib.get_close_matches("--" + name, known, n=1)
    return close[0] if close else None


def unknown_arguments(extras: Iterable[str], known: Sequence[str]) -> UsageError:
    """The UsageError for arguments no parser took: each flag as typed (without its
    '=value'), with a suggestion."""
    extras = list(extras)
    flags = list(dict.fromkeys(a.split("=", 1)[0] for a in extras if a.startswith("-") and a.strip("-")))
    if not flags:
        return UsageError(f"unexpected argument(s): {' '.join(extras)} (see --help)")
    said = []
    for flag in flags:
        hint = suggest(flag, known)
        said.append(f"{flag} (did you mean {hint}?)" if hint else flag)
    return UsageError(f"unknown option{'s' if len(said) > 1 else ''} {', '.join(said)}; see --help")


def parse_with_pipeline_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """argv -> (`parser`'s arguments, Beam PipelineOptions of the rest). A flag that
    neither `parser` nor any Beam option class knows raises UsageError; Beam itself would
    log "Discarding unparseable args" and go on without it."""
    # Beam's own parser class, private: the one way to learn every option its classes add.
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser  # noqa: PLC2701

    args, rest = parser.parse_known_args(argv)
    # What PipelineOptions.get_all_options parses with (its parser class registers
    # ValueProvider arguments), without the warning it logs for the rest.
    beam = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(beam)  # pylint: disable=protected-access
    _, unknown = beam.parse_known_args(rest)
    if unknown:
        raise unknown_arguments(unknown, option_strings(parser) + option_strings(beam))
    return args, PipelineOptions(rest)


def require_runner(options) -> None:
    """Dataflow submission needs Beam's Google Cloud clients (apache-beam[gcp]), which
    the base install leaves to the `dataflow` extra. Without them a Dataflow runner stops
    here, in one line naming the extra, not after the job's set-up with Beam's ImportError.
    The check imports the module Beam's DataflowRunner imports to submit a job."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner or ""
    if "dataflow" not in runner.lower():  # Beam's own test for its "install apache_beam[gcp]" error
        return
    try:
        importlib.import_module("apache_beam.runners.dataflow.internal.apiclient")
    except ImportError as e:
        logging.getLogger(__name__).debug("Dataflow's clients do not import", exc_info=True)
        raise UsageError(f"--runner={runner} needs Beam's Google Cloud clients, which are not installed: install "
                         "the dataflow extra (pip install -e '.[dataflow]' in a clone of batch_caption)") from e


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
