"""A quiet command line: TensorFlow's, absl's and Beam's own logging kept off the terminal.

    setup                     an entry point's first call, before anything imports TensorFlow
    setup_when_command_line   setup() from main(argv) when argv is None
    inherit                   the same quiet in a process that a quiet one started (Beam workers)
    quiet_library             the Python API's quiet: TensorFlow's lines only, logging left alone
    add_verbose_flag          --verbose in a parser: nothing hidden, Beam's INFO logging shown
    hidden                    whether TF_CPP_MIN_LOG_LEVEL hides a line TensorFlow wrote to stderr

TensorFlow prints INFO lines from C++ while `import tensorflow` loads its libraries
(oneDNN, CUDA drivers): absl logs them before TensorFlow applies TF_CPP_MIN_LOG_LEVEL,
and absl reads no environment variable of its own. So a quiet process sets
TF_CPP_MIN_LOG_LEVEL=3 for what comes later (unless the user set it; 3 also hides the
ERROR that cuInit logs on a machine without a GPU) and holds fd 2 in a temporary file
while tensorflow is first imported, by whichever module: the held lines are written
back after the import, less those that TF_CPP_MIN_LOG_LEVEL hides (all of them when the
import fails), so other threads' lines arrive late but arrive (a process killed by a
signal during that import loses them: --verbose shows them). Worker processes' log
records below ERROR from Beam's, TensorFlow's, Keras' or absl's own code are dropped
(Beam's worker set-up chatter among them, but also any other warning Beam's code logs in
a worker); the job's own warnings and every error stay. Worker processes
learn the setting from the environment: the package's __init__ calls inherit().
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

VERBOSE_FLAG = "--verbose"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
MARK = "BATCH_CAPTION_QUIET"  # "1" in a quiet process's environment, for the processes it starts
TF_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
# A C++ log line of TensorFlow/absl: "I0000 00:00:1796290368.816228   27486 port.cc:153] ..."
_CPP_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
# Worker log records of these packages' own set-up; the worker's errors pass whatever their source.
_LIBRARY_LOCATION = re.compile(r'log_location: "[^"]*/(apache_beam|tensorflow|keras|absl)/')


def wants_verbose(argv: list[str]) -> bool:
    """--verbose among the flags (or a prefix argparse would take for it)."""
    return any(a.startswith("--ve") and VERBOSE_FLAG.startswith(a) for a in argv)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """--verbose, which setup() reads from sys.argv: listed in --help, and left out of
    the parsed arguments (nothing else reads it)."""
    parser.add_argument(VERBOSE_FLAG, action=_ReadBySetup,
                        help="show TensorFlow, absl and Beam logging (hidden by default)")


class _ReadBySetup(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        pass


def setup(argv: list[str] | None = None) -> bool:
    """Configures logging for a command line (`argv`: sys.argv[1:]); returns whether it
    is verbose. Quiet, it marks the environment, so that worker processes are quiet too."""
    verbose = wants_verbose(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=LOG_FORMAT)
    if verbose:
        os.environ.pop(MARK, None)
    else:
        os.environ[MARK] = "1"
        _quiet_this_process()
    return verbose


def setup_when_command_line(argv) -> None:
    """An entry point's main(argv): setup() when argv is None (this process's command
    line); a caller's own argv list changes nothing process-wide."""
    if argv is None:
        setup()


def inherit() -> None:
    """In a process whose environment a quiet command line marked: the same quiet."""
    if os.environ.get(MARK) == "1":
        _quiet_this_process()


def quiet_library() -> None:
    """TensorFlow's load-time and C++ log lines kept off stderr, unless the user set
    TF_CPP_MIN_LOG_LEVEL; the application's logging set-up and environment marker are
    left as they are (a library must not configure them)."""
    os.environ.setdefault(TF_LEVEL, "3")
    hold_stderr_on_import("tensorflow")


def _quiet_this_process() -> None:
    quiet_library()
    worker_logs = logging.getLogger("apache_beam.runners.portability.local_job_service")
    if not any(isinstance(f, _DropWorkerSetupChatter) for f in worker_logs.filters):
        worker_logs.addFilter(_DropWorkerSetupChatter())


class _DropWorkerSetupChatter(logging.Filter):
    """A worker's record below ERROR logged from Beam's, TensorFlow's, Keras' or absl's own
    code (Beam forwards each as 'Worker: severity: WARN ... log_location: "..."')."""

    def filter(self, record):
        return record.levelno >= logging.ERROR or not _LIBRARY_LOCATION.search(record.getMessage())


def hidden(line: bytes, min_level: int) -> bool:
    """Whether TF_CPP_MIN_LOG_LEVEL `min_level` hides this line of stderr."""
    if line.rstrip(b"\r\n") == _ABSL_NOTICE:
        return min_level > _SEVERITY[b"W"]
    m = _CPP_LINE.match(line)
    return bool(m) and _SEVERITY[m.group(1)] < min_level


def _min_level() -> int:
    try:
        return int(os.environ.get(TF_LEVEL, "0"))
    except ValueError:
        return 0


class _StderrHeld:
    """fd 2 into a temporary file; on exit back, and the file's lines written to it,
    less those hidden() drops (all of them after an exception)."""

    def __enter__(self):
        self._file = None
        try:
            self._file = tempfile.TemporaryFile()
            sys.stderr.flush()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except OSError:  # no temporary file or no fd to spare: the lines are shown
            if self._file is not None:
                self._file.close()
            self._file = None
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._file is None:
            return
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        with self._file:
            self._file.seek(0)
            held = self._file.read().splitlines(keepends=True)
        level = -1 if exc_type is not None else _min_level()
        kept = memoryview(b"".join(line for line in held if not hidden(line, level)))
        while kept:
            kept = kept[os.write(2, kept):]


def hold_stderr_on_import(name: str) -> None:
    """Runs the first import of top-level module `name` with stderr held (_StderrHeld),
    whichever module imports it; nothing when it is imported already."""
    if name not in sys.modules and not any(isinstance(f, _HoldStderrOnImport) and f.name == name
                                           for f in sys.meta_path):
        sys.meta_path.insert(0, _HoldStderrOnImport(name))


class _HoldStderrOnImport(importlib.abc.MetaPathFinder):
    """Finds `name` for the import machinery once, with a loader that holds stderr while
    the module runs; then leaves sys.meta_path."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HeldStderrLoader(spec.loader)
        return spec


class _HeldStderrLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader  # the module keeps the real one
        with _StderrHeld():
            self._loader.exec_module(module)
