"""Flag errors of every entry point: the flag as typed, the nearest valid one, one line,
exit 2, and never Beam's "Discarding unparseable args" warning."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types

import pytest
from helpers import evaluate_main

from batch_caption import cli, run, train
from batch_caption.report import page
from batch_caption import prepare
from batch_caption.training import scene_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("typed, known, want", [
    ("--beam-size", ["--beam_size", "--batch_size"], "--beam_size"),
    ("--no_draft", ["--draft", "--no-draft"], "--no-draft"),
    ("--outptu", ["--output", "--input", "--run_id"], "--output"),
    ("-output", ["--output"], "--output"),
    ("--zzz", ["--output", "--input"], None),
])
def test_suggest_names_the_nearest_valid_flag(typed, known, want):
    assert cli.suggest(typed, known) == want


def test_unknown_arguments_name_each_flag_as_typed_without_its_value():
    e = cli.unknown_arguments(["--beam-size", "2", "--outptu=x", "--beam-size", "3"], ["--beam_size", "--output"])
    assert str(e) == ("unknown options --beam-size (did you mean --beam_size?), --outptu (did you mean --output?); "
                      "see --help")
    assert str(cli.unknown_arguments(["photos/"], ["--input"])) == "unexpected argument(s): photos/ (see --help)"


def test_beam_options_pass_and_a_beam_typo_is_named(capsys):
    parser = run.build_parser()
    args, options = cli.parse_with_pipeline_options(parser, ["--output", "o", "--runner=DirectRunner",
                                                             "--direct_num_workers", "2"])
    assert args.output == "o" and options.get_all_options()["direct_num_workers"] == 2
    with pytest.raises(cli.UsageError, match=r"^unknown option --runer \(did you mean --runner\?\)"):
        cli.parse_with_pipeline_options(parser, ["--runer=DirectRunner"])
    with pytest.raises(cli.UsageError, match=r"--direct-num-workers \(did you mean --direct_num_workers\?\)"):
        cli.parse_with_pipeline_options(parser, ["--direct-num-workers", "2"])


# (entry point, its main(argv) -> exit code, a valid flag, that flag misspelled with '-', a typo, its fix)
ENTRY_POINTS = [
    ("run", run.main, ["--output", "o"], "--beam-size", "--beam_size", "--outptu", "--output"),
    ("prepare", prepare.main, ["--source", "synthetic", "--output", "o"], "--image-size", "--image_size",
     "--outptu", "--output"),
    ("train", train.main, ["--data", "d", "--output", "o"], "--global-batch-size", "--global_batch_size", "--stesp", "--steps"),
    ("evaluate", evaluate_main, ["--captions", "c", "--references", "r"], "--tokenizer-x", "--tokenizer",
     "--referneces", "--references"),
    ("report", page.main, ["run_dir"], "--thumbnail-size", "--thumbnail_size", "--ouptut", "--output"),
    ("scene_encoder", scene_encoder.main, ["--output", "o"], "--batch-size", "--batch_size", "--epochz", "--epochs"),
]


@pytest.mark.parametrize("name, main, base, dashed, dashed_fix, typo, typo_fix", ENTRY_POINTS,
                         ids=[e[0] for e in ENTRY_POINTS])
def test_every_entry_point_names_a_bad_flag_as_typed_and_suggests(name, main, base, dashed, dashed_fix, typo,
                                                                   typo_fix, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad, fix in ((dashed, dashed_fix), (typo, typo_fix)):
        assert main([*base, bad, "2"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert f"unknown option {bad}" in err
        assert f"(did you mean {fix}?)" in err
    assert os.listdir(tmp_path) == []  # nothing started


def test_a_typo_on_the_command_line_shows_no_beam_warning(tmp_path):
    done = subprocess.run([sys.executable, "-m", "batch_caption.run", "--outptu", str(tmp_path / "o"),
                           "--beam-size", "2"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 2
    assert done.stderr == ("batch_caption.run: error: unknown options --outptu (did you mean --output?), "
                           "--beam-size (did you mean --beam_size?); see --help\n")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- flags from a config's fields


@dataclasses.dataclass(frozen=True)
class _Options:
    path: str = cli.option(help="where")
    size: int = cli.option(96, help="side")
    ratio: float | None = cli.option(None, help="share", default_help="default: the data's")
    mode: str = cli.option("a", help="how", choices=("a", "b"))
    fast: bool = cli.option(False, help="hurry")
    deep: bool = cli.option(False, help="deeper", negatable=True)
    cache: bool = cli.option(True, help="keep", default_help="default on")
    words: tuple[str, ...] = cli.option((), flag="word_list", help="words", parse=lambda s: tuple(s.split(",")),
                                        default_help="")
    note: str = "no flag"


def test_a_config_s_fields_make_its_flags_and_come_back_from_them():
    parser = cli.ArgumentParser()
    cli.add_flags(parser, _Options, unset={"size": "the dataset's"})
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    assert helps == {"-h": helps["-h"], "--path": "where", "--size": "side (default: the dataset's)",
                     "--ratio": "share (default: the data's)", "--mode": "how (default %(default)s)", "--fast": "hurry",
                     "--deep": "deeper (default %(default)s)", "--cache": "keep (default on)", "--word_list": "words"}
    assert cli.flag_names(_Options)["words"] == "word_list" and "note" not in cli.flag_names(_Options)
    with pytest.raises(cli.UsageError, match="the following arguments are required: --path"):
        parser.parse_args([])
    with pytest.raises(cli.UsageError, match="invalid choice: 'c'"):
        parser.parse_args(["--path", "p", "--mode", "c"])
    assert cli.from_args(_Options, parser.parse_args(["--path", "p"])) == _Options("p")
    args = parser.parse_args(["--path", "p", "--size", "64", "--ratio", "0.5", "--mode", "b", "--fast", "--no-deep",
                              "--no-cache", "--word_list", "x,y"])
    assert cli.from_args(_Options, args, note="n") == _Options("p", 64, 0.5, "b", True, False, False, ("x", "y"), "n")


def test_a_field_of_another_type_needs_its_parse():
    @dataclasses.dataclass(frozen=True)
    class Listed:
        words: tuple[str, ...] = cli.option((), help="words")

    with pytest.raises(TypeError, match="Listed.words is tuple"):
        cli.add_flags(cli.ArgumentParser(), Listed)


def test_unset_text_for_every_flag_names_each_field_s_default():
    parser = cli.ArgumentParser()
    cli.add_flags(parser, _Options, ["size", "cache"], unset="elsewhere, else {}")
    assert [(a.dest, a.default, a.help) for a in parser._actions[1:]] == [
        ("size", None, "side (default: elsewhere, else 96)"), ("cache", None, "keep (default: elsewhere, else on)")]


# ---------------------------------------------------------------- Dataflow without its extra

APICLIENT = "apache_beam.runners.dataflow.internal.apiclient"


@pytest.fixture
def no_dataflow_extra(monkeypatch):
    """A base install: Beam's Dataflow client (google-cloud-dataflow-client, from
    apache-beam[gcp]) is missing, so importing Beam's submission module fails (None in
    sys.modules makes it so); google-auth must not be asked for credentials either."""
    import apache_beam.runners.dataflow.internal
    import google.auth
    import google.cloud

    monkeypatch.delitem(sys.modules, APICLIENT, raising=False)
    monkeypatch.delattr(apache_beam.runners.dataflow.internal, "apiclient", raising=False)
    monkeypatch.setitem(sys.modules, "google.cloud.dataflow", None)
    monkeypatch.delattr(google.cloud, "dataflow", raising=False)  # `from google.cloud import dataflow` looks here
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: pytest.fail("credentials looked up"))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)


@pytest.mark.parametrize("main, argv", [
    (run.main, ["--runner=DataflowRunner", "--input", "gs://b/photos/", "--output", "gs://b/out"]),
    (run.main, ["--runner", "dataflow", "--input", "gs://b/photos/", "--output", "gs://b/out", "--model", "scenes"]),
    (prepare.main, ["--runner=DataflowRunner", "--source", "synthetic", "--output", "gs://b/data"]),
], ids=["run", "run-short-name", "prepare"])
def test_dataflow_without_its_extra_fails_in_one_line_before_any_work(main, argv, no_dataflow_extra, tmp_path,
                                                                      capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert ": error: --runner=" in err and "needs Beam's Google Cloud clients, which are not installed" in err
    assert "install the dataflow extra (pip install -e '.[dataflow]'" in err
    assert os.listdir(tmp_path) == []


def test_the_dataflow_check_passes_with_the_extra_and_ignores_other_runners(monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    monkeypatch.setitem(sys.modules, "google.cloud.dataflow", None)
    monkeypatch.setitem(sys.modules, APICLIENT, None)  # no extra: only a Dataflow runner cares
    for runner in ([], ["--runner=DirectRunner"], ["--runner=PrismRunner"]):
        cli.require_runner(PipelineOptions(runner))
    with pytest.raises(cli.UsageError, match=r"^--runner=TestDataflowRunner needs Beam's Google Cloud clients"):
        cli.require_runner(PipelineOptions(["--runner=TestDataflowRunner"]))
    monkeypatch.setitem(sys.modules, APICLIENT, types.ModuleType(APICLIENT))  # the extra installed
    cli.require_runner(PipelineOptions(["--runner=DataflowRunner"]))
