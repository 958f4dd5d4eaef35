"""Launchers in jobs/: the Dataflow launcher's assembled flags (no cloud call), the shell
launchers' flags, and the worker image's Beam pin."""

from __future__ import annotations

import datetime
import importlib.util
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from batch_caption import run
from batch_caption.cli import UsageError

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
SHELL_LAUNCHERS = ("run_local.sh", "nightly_archive.sh")
BASE = ["--project", "my-proj", "--region", "us-central1",
        "--input", "gs://my-bucket/photos/**", "--output", "gs://my-bucket/captions"]


def _load_launcher():
    spec = importlib.util.spec_from_file_location("dataflow_caption", JOBS / "dataflow_caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launcher():
    return _load_launcher()


@pytest.fixture
def no_cloud(monkeypatch):
    """Any Google Cloud client, credentials lookup or network connection fails the test."""
    from apache_beam.internal.gcp import auth
    from apache_beam.io.gcp import gcsio

    def cloud_call(*args, **kwargs):
        raise AssertionError(f"cloud/network call: {args!r:.200}")

    monkeypatch.setattr(gcsio, "GcsIO", cloud_call)
    monkeypatch.setattr(gcsio, "get_or_create_default_gcs_bucket", cloud_call)
    monkeypatch.setattr(auth, "get_service_credentials", cloud_call)
    monkeypatch.setattr(socket.socket, "connect", cloud_call)
    monkeypatch.setattr(socket, "getaddrinfo", cloud_call)


def _values(argv: list[str]) -> dict[str, list[str]]:
    """'--k=v' flags -> {k: [v, ...]} (flags without '=' map to [''])."""
    out: dict[str, list[str]] = {}
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            out.setdefault(key, []).append(value)
    return out


def _beam_flags() -> set[str]:
    """Every option string Beam 2.77's PipelineOptions knows (as get_all_options builds them)."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser  # noqa: PLC2701 (as cli.py)

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return set(parser._option_string_actions)  # pylint: disable=protected-access


def _option_strings(parser) -> set[str]:
    return set(parser._option_string_actions)  # pylint: disable=protected-access


# ---------------------------------------------------------------- dataflow_caption.assemble


def test_assemble_defaults(launcher):
    argv = launcher.assemble(BASE)
    v = _values(argv)
    assert argv[0] == "--runner=DataflowRunner"
    assert v["project"] == ["my-proj"] and v["region"] == ["us-central1"]
    assert v["temp_location"] == ["gs://my-bucket/captions/tmp"]
    assert v["staging_location"] == ["gs://my-bucket/captions/staging"]
    assert v["setup_file"] == [str(REPO / "setup.py")] and (REPO / "setup.py").is_file()
    assert v["machine_type"] == ["n1-standard-8"]
    assert re.fullmatch(r"batch-caption-\d{8}-\d{6}", v["job_name"][0])
    assert v["input"] == ["gs://my-bucket/photos/**"] and v["output"] == ["gs://my-bucket/captions"]
    for absent in ("model", "max_num_workers", "sdk_container_image", "dataflow_service_options", "experiments"):
        assert absent not in v, absent  # bundled model; Dataflow's own sizing; default image


@pytest.mark.parametrize("model", ["scenes", "bundled:scenes"])
def test_assemble_passes_a_bundled_models_name(launcher, model):
    """A model bundled in the package goes to the workers with it: named, not a gs:// path."""
    assert _values(launcher.assemble(BASE + ["--model", model]))["model"] == [model]


def test_assemble_explicit_options(launcher):
    argv = launcher.assemble([
        "--project", "my-proj", "--region", "europe-west4", "--input_list", "gs://my-bucket/a.txt",
        "--input_list", "gs://my-bucket/b.txt", "--input", "gs://my-bucket/x.jpg", "--output", "gs://out-bucket/c/",
        "--model", "gs://my-bucket/models/m1", "--temp_location", "gs://tmp-bucket/t",
        "--staging_location", "gs://tmp-bucket/s", "--worker_machine_type", "n2-highmem-4",
        "--max_num_workers", "50", "--job_name", "captions-2026",
    ])
    v = _values(argv)
    assert v["input_list"] == ["gs://my-bucket/a.txt", "gs://my-bucket/b.txt"]
    assert v["input"] == ["gs://my-bucket/x.jpg"]
    assert v["output"] == ["gs://out-bucket/c"]  # trailing slash dropped: no '//' in OUTPUT/run=...
    assert v["model"] == ["gs://my-bucket/models/m1"]
    assert v["temp_location"] == ["gs://tmp-bucket/t"] and v["staging_location"] == ["gs://tmp-bucket/s"]
    assert v["machine_type"] == ["n2-highmem-4"] and v["max_num_workers"] == ["50"]
    assert v["job_name"] == ["captions-2026"]


def test_assemble_gpu(launcher):
    argv = launcher.assemble(BASE + ["--gpu", "nvidia-tesla-t4:1", "--sdk_container_image", "us-docker.pkg.dev/p/r/bc:1"])
    v = _values(argv)
    assert v["dataflow_service_options"] == ["worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"]
    assert v["experiments"] == ["use_runner_v2"]
    assert v["sdk_container_image"] == ["us-docker.pkg.dev/p/r/bc:1"]
    assert "setup_file" in v  # the launcher's code still goes to the workers
    assert launcher.gpu_service_option("nvidia-l4") == "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
    assert launcher.gpu_service_option("NVIDIA-TESLA-V100:4").endswith("type:nvidia-tesla-v100;count:4;install-nvidia-driver")
    no_setup = _values(launcher.assemble(BASE + ["--sdk_container_image", "img:1", "--no_setup_file"]))
    assert "setup_file" not in no_setup and no_setup["experiments"] == ["use_runner_v2"]


def test_assemble_passes_other_flags_through(launcher):
    extra = ["--beam_size", "5", "--num_workers=2", "--incremental", "--run_id", "Nightly_2026.1",
             "--experiments=shuffle_mode=service", "--labels", "team=ml"]
    argv = launcher.assemble(BASE + extra)
    assert argv[-len(extra):] == extra
    assert _values(argv)["job_name"] == ["batch-caption-nightly-2026-1"]  # from --run_id


@pytest.mark.parametrize("argv, message", [
    (["--region", "r", "--input", "gs://my-bucket/x", "--output", "gs://my-bucket/o"], "--project"),
    (BASE[:4] + ["--input", "gs://my-bucket/x"], "--output"),
    (BASE[:4] + ["--output", "gs://my-bucket/o"], "--input or --input_list"),
    (BASE[:6] + ["--output", "/local/out"], "--output"),
    (BASE[:4] + ["--input", "photos/", "--output", "gs://my-bucket/o"], "--input"),
    (BASE[:6] + ["--output", "gs://b/o"], "--output"),  # bucket name too short: Beam would make its own
    (BASE + ["--model", "/home/me/model"], "--model"),
    (BASE + ["--model", "bundled:nonexistent"], "--model bundled:nonexistent"),
    (BASE + ["--temp_location", "gs://Bad_Bucket/t"], "--temp_location"),
    (BASE + ["--gpu", "nvidia-tesla-t4:1"], "--sdk_container_image"),
    (BASE + ["--gpu", "t4", "--sdk_container_image", "img:1"], "--gpu"),
    (BASE + ["--no_setup_file"], "--sdk_container_image"),
    (BASE + ["--job_name", "Captions_2026"], "--job_name"),
    (BASE + ["--max_num_workers", "0"], "--max_num_workers"),
    (BASE + ["--runner=DirectRunner"], "--runner"),
    (BASE + ["--setup_file", "other/setup.py"], "--setup_file"),
    (BASE + ["--proj", "x"], None),  # no abbreviations: passed through, then unknown to run.parse
])
def test_assemble_rejects(launcher, argv, message):
    if message is None:
        with pytest.raises(UsageError, match="unknown option"):
            run.parse(launcher.assemble(argv))
        return
    with pytest.raises(UsageError, match=re.escape(message)):
        launcher.assemble(argv)


def test_run_parse_accepts_every_assembled_flag(launcher, no_cloud):
    """batch_caption.run.parse (which rejects any flag neither it nor Beam knows) takes the
    assembled command, and Beam reads each value where Dataflow will look for it."""
    from apache_beam.options.pipeline_options import (
        DebugOptions, GoogleCloudOptions, SetupOptions, StandardOptions, WorkerOptions)

    argv = launcher.assemble(BASE + [
        "--input_list", "gs://my-bucket/new.txt", "--model", "gs://my-bucket/m", "--max_num_workers", "20",
        "--gpu", "nvidia-l4:2", "--machine_type", "g2-standard-24", "--sdk_container_image", "img:1",
        "--beam_size", "5", "--incremental", "--run_id", "r1", "--num_workers", "2", "--experiments=foo",
    ])
    config, options = run.parse(argv)
    assert config.inputs == ("gs://my-bucket/photos/**",) and config.input_lists == ("gs://my-bucket/new.txt",)
    assert (config.output, config.model, config.run_id, config.decode.beam_size) == (
        "gs://my-bucket/captions", "gs://my-bucket/m", "r1", 5)
    assert config.incremental
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.job_name) == ("my-proj", "us-central1", "batch-caption-r1")
    assert (cloud.temp_location, cloud.staging_location) == ("gs://my-bucket/captions/tmp",
                                                             "gs://my-bucket/captions/staging")
    assert cloud.dataflow_service_options == ["worker_accelerator=type:nvidia-l4;count:2;install-nvidia-driver"]
    worker = options.view_as(WorkerOptions)
    assert (worker.machine_type, worker.max_num_workers, worker.num_workers) == ("g2-standard-24", 20, 2)
    assert worker.sdk_container_image == "img:1"
    assert options.view_as(SetupOptions).setup_file == str(REPO / "setup.py")
    assert options.view_as(DebugOptions).experiments == ["use_runner_v2", "foo"]
    assert {a.split("=", 1)[0] for a in argv if a.startswith("--")} <= _beam_flags() | _option_strings(
        run.build_parser())


def test_beam_dataflow_validator_accepts_assembled_options(launcher, no_cloud):
    """Beam's own DataflowRunner checks (job name, project id, gs:// paths, worker counts)
    pass, without a cloud call (Beam's dry_run skips its bucket soft-delete lookup)."""
    from apache_beam.options.pipeline_options import TestOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    for extra in ([], ["--gpu", "nvidia-tesla-t4", "--sdk_container_image", "img:1", "--max_num_workers", "3"]):
        _, options = run.parse(launcher.assemble(BASE + extra))
        options.view_as(TestOptions).dry_run = True
        assert PipelineOptionsValidator(options, DataflowRunner()).validate() == []


def test_main_dry_run_prints_and_does_not_run(launcher, monkeypatch, capsys):
    def must_not_run(argv):
        raise AssertionError("dry run started the job")

    monkeypatch.setattr(run, "main", must_not_run)
    # One clock for both assemblies: the default job name holds the UTC second.
    job_name = launcher.default_job_name
    monkeypatch.setattr(launcher, "default_job_name", lambda run_id, now=None: job_name(run_id, now=1_800_000_000))
    argv = BASE + ["--gpu", "nvidia-tesla-t4:1", "--sdk_container_image", "img:1", "--beam_size", "5"]
    assert launcher.main(argv + ["--dry_run"]) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed[:3] == ["python", "-m", "batch_caption.run"]
    assert printed[3:] == launcher.assemble(argv)


def test_main_runs_batch_caption_run_with_assembled_flags(launcher, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(run, "main", lambda argv: calls.append(argv) or 0)
    # One clock for both assemblies: the default job name holds the UTC second, which may
    # tick between the two calls.
    job_name = launcher.default_job_name
    monkeypatch.setattr(launcher, "default_job_name", lambda run_id, now=None: job_name(run_id, now=1_800_000_000))
    assert launcher.main(BASE) == 0
    assert calls == [launcher.assemble(BASE)]
    assert launcher.main(BASE[:4]) == 2  # no --output
    err = capsys.readouterr().err
    assert err.startswith("dataflow_caption: error:") and len(err.strip().splitlines()) == 1 and not calls[1:]


# ---------------------------------------------------------------- shell launchers


@pytest.mark.parametrize("name", SHELL_LAUNCHERS + ("dataflow_caption.py",))
def test_launcher_is_executable(name):
    path = JOBS / name
    assert path.is_file()
    assert os.stat(path).st_mode & stat.S_IXUSR, f"chmod +x jobs/{name}"
    assert path.read_text().startswith("#!/usr/bin/env ")
    if name.endswith(".sh"):
        subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize("name", SHELL_LAUNCHERS)
def test_shell_launcher_flags_exist(name, launcher):
    """Every --flag a shell launcher mentions (commands and usage comments) is one that
    batch_caption.run, Beam or the Dataflow launcher knows."""
    text = (JOBS / name).read_text()
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?![\w-])", text))
    known = _option_strings(run.build_parser()) | _beam_flags() | _option_strings(launcher.build_parser())
    assert flags and not flags - known, f"unknown flags in jobs/{name}: {sorted(flags - known)}"


@pytest.fixture
def echo_python(tmp_path):
    """A stand-in for PYTHON that prints its arguments one a line instead of running."""
    stub = tmp_path / "echo-python"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(0o755)
    return str(stub)


def _shell(name, env_extra, args=(), cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("ARCHIVE", "OUT", "RUN_ID", "PROJECT", "REGION", "DRY_RUN")}
    env.update(env_extra)
    return subprocess.run(["bash", str(JOBS / name), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_run_local_command(echo_python, tmp_path):
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    done = _shell("run_local.sh", {"PYTHON": echo_python}, ["--input", str(tmp_path), "--beam_size", "2"])
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[:2] == ["-m", "batch_caption.run"] and argv[-4:] == ["--input", str(tmp_path), "--beam_size", "2"]
    config, options = run.parse(argv[2:])
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    direct = options.view_as(DirectOptions)
    assert (direct.direct_num_workers, direct.direct_running_mode) == (0, "multi_processing")
    assert config.decode.beam_size == 2


def _today_ids() -> set[str]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {f"nightly-{d:%Y%m%d}" for d in (now, now + datetime.timedelta(minutes=2))}  # midnight race


def test_nightly_archive_local_command(echo_python, tmp_path):
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    done = _shell("nightly_archive.sh", {"PYTHON": echo_python, "ARCHIVE": "/data/archive", "OUT": str(tmp_path)},
                  ["--batch_size", "8"])
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[:2] == ["-m", "batch_caption.run"]
    config, options = run.parse(argv[2:])
    assert config.incremental and config.inputs == ("/data/archive",) and config.output == str(tmp_path)
    assert config.run_id in _today_ids() and config.batch_size == 8
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    # One in-memory process: a night is listing and joining (bench/archive_nightly.py).
    assert options.view_as(DirectOptions).direct_running_mode in (None, "in_memory")

    dry = _shell("nightly_archive.sh", {"PYTHON": echo_python, "ARCHIVE": "a b", "OUT": "o", "RUN_ID": "x1",
                                        "DRY_RUN": "1"})
    assert dry.returncode == 0 and dry.stdout.startswith(f"{echo_python} -m batch_caption.run --input a\\ b ")
    assert "--run_id x1" in dry.stdout

    missing = _shell("nightly_archive.sh", {"PYTHON": echo_python, "OUT": "o"})
    assert missing.returncode != 0 and "ARCHIVE" in missing.stderr and not missing.stdout


def test_nightly_archive_dataflow_command(tmp_path):
    from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions

    env = {"PYTHON": sys.executable, "ARCHIVE": "gs://my-bucket/archive", "OUT": "gs://my-bucket/captions",
           "PROJECT": "my-proj", "REGION": "us-central1", "DRY_RUN": "1"}
    done = _shell("nightly_archive.sh", env, ["--max_num_workers", "7"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout)
    assert argv[:3] == ["python", "-m", "batch_caption.run"]
    config, options = run.parse(argv[3:])
    assert config.incremental and config.run_id in _today_ids()
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert cloud.job_name == "batch-caption-" + config.run_id and cloud.project == "my-proj"
    assert "--max_num_workers=7" in argv


# ---------------------------------------------------------------- worker image


def test_dockerfile_pins_launcher_beam_version():
    """Dataflow needs the worker image's Beam and Python to be the launcher's: the FROM tag
    must be the installed apache-beam, inside requirements.txt's range, on a Python set by
    a build argument whose default setup.py allows, as it allows this interpreter's."""
    import apache_beam
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    text = (JOBS / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(froms) == 1, froms
    m = re.fullmatch(r"apache/beam_python\$\{PYTHON\}_sdk:(\d+\.\d+\.\d+)", froms[0])
    assert m, froms[0]
    (beam,) = m.groups()
    before_from = text[:re.search(r"^FROM\s", text, flags=re.M).start()]  # where FROM can use an ARG
    (python,) = re.findall(r"^ARG PYTHON=(\d+\.\d+)$", before_from, flags=re.M)
    assert beam == apache_beam.__version__
    reqs = [Requirement(line) for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    beam_req = next(r for r in reqs if r.name == "apache-beam")
    assert beam_req.specifier.contains(beam)
    python_requires = re.search(r"python_requires=\"([^\"]+)\"", (REPO / "setup.py").read_text()).group(1)
    assert SpecifierSet(python_requires).contains(python + ".0")
    assert SpecifierSet(python_requires).contains(f"{sys.version_info.major}.{sys.version_info.minor}.0")
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M):  # everything it copies exists
        for name in src.split():
            assert (REPO / name).exists(), name
    assert "requirements.txt" in text and '"/src[dataflow]"' in text  # the dataflow extra: Beam[gcp]


@pytest.mark.parametrize("script", sorted(p.name for p in JOBS.glob("*.sh")))
def test_every_launcher_parses(script):
    """`bash -n` on every shell launcher: a syntax error fails here, not on a cluster."""
    done = subprocess.run(["bash", "-n", str(JOBS / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _train_commands() -> list[tuple[str, list[str]]]:
    """(script, argv) for every `python -m batch_caption.train` a shell recipe runs, and for
    vertex_train.sh's comma-separated ARGS: continuation lines joined, each array the script
    defines expanded (once per definition), every variable standing for 1000000000."""
    found = []
    for path in sorted(JOBS.glob("*.sh")):
        text = path.read_text().replace("\\\n", "")
        arrays: dict[str, list[str]] = {}
        for name, body in re.findall(r"(\w+)=\(([^)]*)\)", text):
            arrays.setdefault(name, []).append(body)
        lines = [ln.split("batch_caption.train", 1)[1] for ln in text.splitlines()
                 if re.search(r"python -m batch_caption\.train(\s|$)", ln)]
        lines += [m.replace(",", " ") for m in re.findall(r'^ARGS="([^"]*)"', text, flags=re.M)]
        for line in lines:
            variants = [line]
            for name, bodies in arrays.items():
                ref = f'"${{{name}[@]}}"'
                variants = [v.replace(ref, body) for v in variants for body in (bodies if ref in v else [""])]
            for v in variants:
                v = re.sub(r"\$\{?\w+(:-[^}]*)?\}?", "1000000000", v)
                found.append((path.name, shlex.split(v)))
    return found


def test_the_recipes_train_commands_are_found():
    counts: dict[str, int] = {}
    for script, _ in _train_commands():
        counts[script] = counts.get(script, 0) + 1
    assert counts == {"train_coco.sh": 1, "train_flickr8k.sh": 4, "train_scenes_model.sh": 2, "vertex_train.sh": 1}


@pytest.mark.parametrize("script,argv", _train_commands(), ids=lambda x: x if isinstance(x, str) else "argv")
def test_every_recipes_train_flags_are_accepted(script, argv):
    """train's parser and TrainConfig's checks (flags that contradict each other, such as
    --no-train_encoder with --fine_tune_after_steps) accept what each recipe passes."""
    from batch_caption import train

    try:
        train.parse(argv)
    except (UsageError, SystemExit) as e:
        pytest.fail(f"jobs/{script}: {e}")


def test_a_refused_train_flag_fails_the_recipe_check():
    from batch_caption import train

    with pytest.raises(UsageError, match="fine_tune_after_steps"):
        train.parse(["--data", "d", "--output", "o", "--no-train_encoder", "--fine_tune_after_steps", "5",
                     "--steps", "10"])


def test_the_flickr8k_recipe_names_its_missing_inputs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGES", "TEXT")}
    done = subprocess.run(["bash", str(JOBS / "train_flickr8k.sh"), str(tmp_path / "work")], capture_output=True,
                          text=True, env=env)
    assert done.returncode != 0 and "set IMAGES" in done.stderr
    assert not (tmp_path / "work").exists()  # nothing started
