"""A quiet command line: no TensorFlow/absl/Beam set-up logging unless --verbose, the
job's own lines always."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

from batch_caption import bundled, cli, evaluate, quiet, run, train
from batch_caption.prepare import config as prepare_config
from batch_caption.report import page
from batch_caption.training import scene_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ["batch_caption.run", "batch_caption.train", "batch_caption.prepare", "batch_caption.evaluate",
                "batch_caption.report", "batch_caption.training.scene_encoder"]
PARSERS = [run.build_parser, train.build_parser, prepare_config.build_parser, evaluate.build_parser,
           page.build_parser, scene_encoder.build_parser]
# What TensorFlow 2.21 prints on a CPU machine as it loads and looks for devices.
ONEDNN = (b"I0000 00:00:1796290368.816228   27486 port.cc:153] oneDNN custom operations are on. You may see "
          b"slightly different numerical results due to floating-point round-off errors.\n")
CUINIT = (b"E0000 00:00:1796290373.756568   27486 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA "
          b"error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
TF_LINE = re.compile(r"I0000|W0000|E0000|oneDNN|absl|cuda", re.IGNORECASE)


def _clean_env() -> dict[str, str]:
    """This environment without what the suite or a quiet parent set: what a user's shell has."""
    env = {k: v for k, v in os.environ.items() if k not in (quiet.TF_LEVEL, quiet.MARK)}
    env["PYTHONPATH"] = REPO
    return env


# --- the pieces -----------------------------------------------------------------------


@pytest.mark.parametrize("line, level, hide", [
    (ONEDNN, 3, True), (ONEDNN, 1, True), (ONEDNN, 0, False),
    (CUINIT, 3, True), (CUINIT, 2, False),
    (NOTICE, 3, True), (NOTICE, 1, False),
    (b"[batch_caption] 1/8 images captioned, first after 7.4 s, ETA ?\n", 3, False),
    (b"WARNING batch_caption.storage.lock: took over the lock of run x\n", 3, False),
    (b"I0000 is not a log line without its source\n", 3, False),
])
def test_hidden_follows_tf_cpp_min_log_level(line, level, hide):
    assert quiet.hidden(line, level) is hide


@pytest.mark.parametrize("argv, verbose", [
    (["--verbose"], True), (["--output", "o", "--verb"], True), (["--ve"], True),
    ([], False), (["--vocab_split", "train"], False), (["--v"], False), (["--verbosely"], False),
])
def test_verbose_is_read_from_the_flags(argv, verbose):
    assert quiet.wants_verbose(argv) is verbose


@pytest.mark.parametrize("build_parser", PARSERS, ids=ENTRY_POINTS)
def test_every_entry_point_lists_verbose(build_parser):
    assert "--verbose" in build_parser().format_help()


def test_verbose_is_accepted_and_left_out_of_the_parsed_arguments():
    parser = cli.ArgumentParser()
    parser.add_argument("--steps", type=int)
    quiet.add_verbose_flag(parser)
    assert vars(parser.parse_args(["--verbose", "--steps", "2"])) == {"steps": 2}
    assert vars(parser.parse_args([])) == {"steps": None}
    # A config built from every parsed argument takes the flag as well.
    assert train.parse(["--data", "d", "--output", "o", "--verbose"]).steps == train.parse(["--data", "d", "--output", "o"]).steps


def _fake_library(tmp_path, name: str, body: str) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(textwrap.dedent(body))


def test_the_first_import_of_a_module_runs_with_its_log_lines_held_back(tmp_path, monkeypatch, capfd):
    _fake_library(tmp_path, "fake_tf_quiet", f"""
        import os
        os.write(2, {ONEDNN!r})
        os.write(2, b"a line of another thread\\n")
        os.write(2, {NOTICE!r} + {CUINIT!r})
        LOADED = True
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setenv(quiet.TF_LEVEL, "3")
    quiet.hold_stderr_on_import("fake_tf_quiet")
    quiet.hold_stderr_on_import("fake_tf_quiet")  # once is enough
    assert sum(isinstance(f, quiet._HoldStderrOnImport) for f in sys.meta_path) == 1
    import fake_tf_quiet

    assert fake_tf_quiet.LOADED and not isinstance(fake_tf_quiet.__loader__, quiet._HeldStderrLoader)
    assert capfd.readouterr().err == "a line of another thread\n"
    assert not any(isinstance(f, quiet._HoldStderrOnImport) for f in sys.meta_path)
    monkeypatch.delitem(sys.modules, "fake_tf_quiet")


def test_a_failed_import_shows_every_line_it_wrote(tmp_path, monkeypatch, capfd):
    _fake_library(tmp_path, "fake_tf_broken", f"""
        import os
        os.write(2, {ONEDNN!r})
        raise ImportError("libcudart.so.12: cannot open shared object file")
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setenv(quiet.TF_LEVEL, "3")
    quiet.hold_stderr_on_import("fake_tf_broken")
    with pytest.raises(ImportError, match="libcudart"):
        import fake_tf_broken  # noqa: F401
    assert capfd.readouterr().err == ONEDNN.decode()


def _worker_record(level: int, location: str) -> logging.LogRecord:
    """A worker's log entry as Beam's local job service logs it in the driver."""
    entry = (f'severity: WARN timestamp {{   seconds: 1796290523 }} message: "No semi_persistent_directory found" '
             f'log_location: "{location}" thread: "MainThread"')
    return logging.LogRecord("apache_beam.runners.portability.local_job_service", level, __file__, 1,
                             "Worker: %s", (entry,), None)


@pytest.mark.parametrize("level, location, shown", [
    (logging.WARNING, "/venv/lib/python3.11/site-packages/apache_beam/runners/worker/sdk_worker_main.py:421", False),
    (logging.WARNING, "/venv/lib/python3.11/site-packages/keras/src/trainers/epoch_iterator.py:74", False),
    (logging.ERROR, "/venv/lib/python3.11/site-packages/apache_beam/runners/worker/sdk_worker.py:300", True),
    (logging.WARNING, "/srv/batch_caption/batch_caption/core/read.py:120", True),
])
def test_workers_library_chatter_is_dropped_and_their_errors_and_the_jobs_warnings_kept(level, location, shown):
    assert quiet._DropWorkerSetupChatter().filter(_worker_record(level, location)) is shown


@pytest.fixture
def fresh_process_state(monkeypatch):
    """setup() changes the process: its environment, sys.meta_path, a Beam logger's filters."""
    monkeypatch.delenv(quiet.MARK, raising=False)
    monkeypatch.delenv(quiet.TF_LEVEL, raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    beam_logger = logging.getLogger("apache_beam.runners.portability.local_job_service")
    monkeypatch.setattr(beam_logger, "filters", list(beam_logger.filters))
    return monkeypatch


def test_quiet_setup_marks_the_environment_for_workers_and_keeps_a_users_level(fresh_process_state):
    assert quiet.setup(["--output", "out"]) is False
    assert os.environ[quiet.MARK] == "1" and os.environ[quiet.TF_LEVEL] == "3"
    fresh_process_state.setenv(quiet.TF_LEVEL, "1")
    quiet.inherit()  # what a worker process does when the package is imported
    assert os.environ[quiet.TF_LEVEL] == "1"


def test_main_called_with_its_own_arguments_changes_nothing_process_wide(fresh_process_state):
    quiet.setup_when_command_line(["--output", "out"])
    assert quiet.MARK not in os.environ and quiet.TF_LEVEL not in os.environ


def test_verbose_setup_changes_nothing_and_unmarks_the_environment(fresh_process_state):
    fresh_process_state.setenv(quiet.MARK, "1")
    meta_path = list(sys.meta_path)
    assert quiet.setup(["--verbose"]) is True
    assert quiet.MARK not in os.environ and quiet.TF_LEVEL not in os.environ and sys.meta_path == meta_path


# --- the real command lines, in processes of their own ---------------------------------


def test_entry_points_leave_tensorflow_unimported():
    # setup() runs in each entry point's __main__ block, after the module's own imports:
    # early enough only while those imports leave TensorFlow and Keras alone.
    code = f"import sys, {', '.join(ENTRY_POINTS)}; print(sorted({{'tensorflow', 'keras'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_importing_the_entry_points_prints_nothing():
    """On the base install too: `import apache_beam` logs through the root logger when one
    of its client libraries is missing (requirements.txt takes google-apitools for that)."""
    done = subprocess.run([sys.executable, "-c", f"import {', '.join(ENTRY_POINTS)}"], capture_output=True,
                          text=True, timeout=120, env=_clean_env())
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_verbose_is_accepted_on_the_command_line():
    done = subprocess.run([sys.executable, "-m", "batch_caption.evaluate", "--verbose", "--help"],
                          capture_output=True, text=True, timeout=120, env=_clean_env())
    assert done.returncode == 0, done.stderr
    assert "--verbose" in done.stdout


@pytest.mark.parametrize("mode", [[], ["--direct_num_workers=1", "--direct_running_mode=multi_processing"]],
                         ids=["in_memory", "worker_process"])
def test_captioning_the_samples_prints_no_tensorflow_line(mode, tmp_path):
    done = subprocess.run([sys.executable, "-m", "batch_caption.run", "--runner=DirectRunner",
                           "--output", str(tmp_path / "out"), *mode],
                          capture_output=True, text=True, timeout=300, env=_clean_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    n = len(bundled.default().sample_files())
    assert f"{n} inputs, {n} captioned, 0 failed" in done.stdout
    noise = [line for line in done.stderr.splitlines() if TF_LINE.search(line)]
    assert noise == [], "\n".join(noise)
