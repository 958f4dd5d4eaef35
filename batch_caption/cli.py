"""What every entry point's command line shares: one kind of usage error, and a parser
that reports bad flags as that error (one line, exit code 2) instead of argparse's
usage dump. An unknown flag is named as typed, with the nearest valid one
(`--beam-size` -> `--beam_size`, `--outptu` -> `--output`); the Beam entry points check
Beam's pipeline options the same way, before Beam would log and drop them.

A config dataclass defines its options once: a field made by `option` carries its flag's
help (and choices), `add_flags` puts those flags on a parser and `from_args` builds the
config from what was parsed."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from batch_caption import quiet

T = TypeVar("T")


class UsageError(ValueError):
    """Bad flags or inputs, found before any work; the CLI prints one line, exits 2."""


def require(ok: bool, message: str) -> None:
    """Raises UsageError(message) unless `ok`: a config's flag checks, one line each."""
    if not ok:
        raise UsageError(message)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line (see `option`)."""

    help: str
    name: str | None = None
    choices: Iterable[Any] | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    default_help: str | None = None
    negatable: bool = False


_FLAG = "batch_caption.flag"  # the metadata key of a field made by `option`


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
           choices: Iterable[Any] | None = None, metavar: str | None = None, parse: Callable[[str], Any] | None = None,
           default_help: str | None = None, negatable: bool = False,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a command-line flag, --NAME (or --`flag`), for `add_flags`.

    help: what the option does; its default is said after it, "(default %(default)s)", or
      "(`default_help`)" when given ("" says nothing).
    choices, metavar: argparse's (a registry's membership is checked when flags are parsed).
    parse: text -> value; default: the field's type (int, float, str). A bool field is a
      switch: --NAME when it defaults to False (also --no-NAME when `negatable`), else
      --NAME / --no-NAME.
    """
    spec = Flag(help, flag, choices, metavar, parse, default_help, negatable)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_FLAG: spec})


def flag_fields(cls: type) -> dict[str, dataclasses.Field]:
    """`cls`'s fields that have a flag (`option`), by name, in order."""
    return {f.name: f for f in dataclasses.fields(cls) if _FLAG in f.metadata}


def flag_names(cls: type) -> dict[str, str]:
    """Field name -> its flag's name (without "--"), for `cls`'s fields that have one."""
    return {name: f.metadata[_FLAG].name or name for name, f in flag_fields(cls).items()}


def add_flags(parser: Any, cls: type, names: Iterable[str] | None = None, *,
              unset: Mapping[str, str] | str | None = None) -> None:
    """Adds the flag of each of `cls`'s fields in `names` (default: every field with one,
    in order) to `parser` or an argument group. A field without a default is a required flag.

    unset: field name -> what leaving its flag out means, where the value then comes from
      elsewhere ("the dataset's"); or one such text for every flag added, "{}" in it
      standing for the field's default. Those flags default to None (`from_args` leaves
      them out) and their help ends "(default: <that>)".
    """
    fields, hints = flag_fields(cls), typing.get_type_hints(cls)
    names = list(fields if names is None else names)
    if isinstance(unset, str):
        unset = {name: unset.format(_shown(_default(fields[name]))) for name in names}
    unset = unset or {}
    for name in names:
        field = fields[name]
        spec: Flag = field.metadata[_FLAG]
        kind = _value_type(hints[name])
        kwargs: dict[str, Any] = {"default": None if name in unset else _default(field)}
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        if kind is bool:
            switch = kwargs["default"] is False and not spec.negatable
            kwargs["action"] = "store_true" if switch else argparse.BooleanOptionalAction
        elif spec.parse is None and kind not in (int, float, str):
            raise TypeError(f"{cls.__name__}.{name} is {kind}: its option needs a parse")
        else:
            kwargs["type"] = spec.parse or (kind if kind in (int, float) else None)
        if spec.choices is not None:
            kwargs["choices"] = spec.choices
        if spec.metavar is not None:
            kwargs["metavar"] = spec.metavar
        if name in unset:
            said = f"default: {unset[name]}"
        elif spec.default_help is not None:
            said = spec.default_help
        else:
            said = "" if kwargs.get("action") == "store_true" or kwargs["default"] is None else "default %(default)s"
        kwargs["help"] = f"{spec.help} ({said})" if said else spec.help
        parser.add_argument(f"--{spec.name or name}", **kwargs)


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Field name -> value, for each of `cls`'s flags that `args` holds a value (not None) for."""
    values = {}
    for name, flag in flag_names(cls).items():
        value = getattr(args, flag, None)
        if value is not None:
            values[name] = value
    return values


def from_args(cls: type[T], args: argparse.Namespace, /, **values: Any) -> T:
    """`cls` from the flags `add_flags` gave the parser of `args`, and `values` (fields
    without a flag, converted ones), which win. A flag at None leaves its field's default."""
    return cls(**{**flag_values(args, cls), **values})


def flag_error(e: ValueError, cls: type) -> UsageError:
    """A config's ValueError as the command line says it: a message that starts with a
    field's name ("dropout must be ...") starts with its flag ("--dropout must be ...")."""
    message = str(e)
    for name, flag in flag_names(cls).items():
        if message.startswith(f"{name} "):
            return UsageError(f"--{flag}{message[len(name):]}")
    return UsageError(message)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _shown(value: Any) -> str:
    """A default as help says it: a switch is on or off."""
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _value_type(hint: Any) -> Any:
    """`X` of a field typed `X` or `X | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [k for k in typing.get_args(hint) if k is not type(None)]
        return kinds[0] if len(kinds) == 1 else hint
    return hint


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
