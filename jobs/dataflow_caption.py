#!/usr/bin/env python
"""Caption images in Cloud Storage on Google Cloud Dataflow.

A thin launcher: it only assembles the command line of `python -m batch_caption.run`
(DataflowRunner, project/region, temp/staging locations, worker sizing, GPUs, the
setup file that installs this package - bundled models included - on the workers) and
runs it in this process. Run it from a checkout (it needs the repo's setup.py) installed
with the dataflow extra, `pip install -e '.[dataflow]'` (Beam's Google Cloud clients):

    python jobs/dataflow_caption.py --project my-proj --region us-central1 \\
        --input 'gs://bucket/photos/**' --output gs://bucket/captions [--model NAME|gs://bucket/models/m] \\
        [--max_num_workers 50] [--machine_type n1-standard-8] \\
        [--gpu nvidia-tesla-t4:1 --sdk_container_image REGION-docker.pkg.dev/PROJ/REPO/batch-caption:TAG] \\
        [--dry_run] [any other batch_caption.run or Beam flag, passed through: --beam_size 5, --run_id x, ...]

--dry_run prints the assembled command and exits 0 (nothing touches the cloud).
Defaults: --temp_location OUTPUT/tmp, --staging_location OUTPUT/staging,
--machine_type n1-standard-8, --job_name batch-caption-<run id or UTC time>.
--gpu TYPE[:COUNT] attaches GPUs (Dataflow service option worker_accelerator, with the
NVIDIA driver installed) and needs --sdk_container_image: a worker image with CUDA-enabled
TensorFlow, built from jobs/Dockerfile with --build-arg GPU=1.
Exit codes are those of batch_caption.run (2: bad command line, nothing started).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_FILE = os.path.join(REPO_ROOT, "setup.py")
DEFAULT_MACHINE_TYPE = "n1-standard-8"
_JOB_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Beam's validator: JOB_PATTERN
_GPU_RE = re.compile(r"^(?P<type>nvidia-[a-z0-9-]*[a-z0-9])(:(?P<count>[1-9][0-9]*))?$")


def _usage_error(message: str):
    from batch_caption.cli import UsageError

    return UsageError(message)


def _is_bundled(model: str) -> bool:
    """Whether --model names a model bundled in the package (the workers install it)."""
    from batch_caption import bundled

    try:
        return bundled.find(model) is not None
    except KeyError as e:
        raise _usage_error(f"--model {model}: {e.args[0]}") from e


def build_parser() -> argparse.ArgumentParser:
    from batch_caption import cli

    p = cli.ArgumentParser(
        prog="python jobs/dataflow_caption.py",
        description="Run batch_caption.run on Google Cloud Dataflow. Unknown flags go to batch_caption.run unchanged.",
        allow_abbrev=False,
    )
    p.add_argument("--project", required=True, help="Google Cloud project id")
    p.add_argument("--region", required=True, help="Dataflow region, e.g. us-central1")
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="gs:// file, glob or prefix (repeatable)")
    p.add_argument("--input_list", action="append", default=[], metavar="FILE",
                   help="gs:// text file of image paths, one a line (repeatable)")
    p.add_argument("--output", required=True, help="gs:// output directory; runs go to OUTPUT/run=<run_id>/")
    p.add_argument("--model", default=None, metavar="NAME|BUNDLE",
                   help="a model bundled in the package, by name, or a gs:// model bundle (default: the package's "
                   "default bundled model)")
    p.add_argument("--temp_location", default=None, help="gs:// temp directory (default OUTPUT/tmp)")
    p.add_argument("--staging_location", default=None, help="gs:// staging directory (default OUTPUT/staging)")
    p.add_argument("--machine_type", "--worker_machine_type", dest="machine_type", default=DEFAULT_MACHINE_TYPE,
                   help=f"worker machine type (default {DEFAULT_MACHINE_TYPE}; GPUs: T4/V100/P4/P100 need n1-*, "
                        "L4 g2-*, A100 a2-*)")
    p.add_argument("--max_num_workers", type=int, default=None, help="autoscaling limit (default: Dataflow's)")
    p.add_argument("--gpu", default=None, metavar="TYPE[:COUNT]",
                   help="GPUs per worker, e.g. nvidia-tesla-t4:1 or nvidia-l4:1 (needs --sdk_container_image)")
    p.add_argument("--sdk_container_image", default=None,
                   help="custom worker image built from jobs/Dockerfile (same Beam version as this launcher)")
    p.add_argument("--job_name", default=None,
                   help="Dataflow job name, [a-z]([-a-z0-9]*[a-z0-9])? (default batch-caption-<run id or UTC time>)")
    p.add_argument("--no_setup_file", action="store_true",
                   help="do not pass --setup_file: the --sdk_container_image already holds this exact code")
    p.add_argument("--dry_run", action="store_true", help="print the assembled command and exit 0")
    return p


def _require_gs(flag: str, value: str) -> None:
    """A gs:// path with a valid bucket name, checked with Beam's own validator (pure regex).

    Checked here because Beam, given bad temp and staging locations, goes on to look up or
    create a default bucket in the project instead of failing."""
    from types import SimpleNamespace

    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    if not value.startswith("gs://"):
        raise _usage_error(f"{flag} must be a gs:// path that Dataflow workers can read, got {value!r}")
    probe = value if "/" in value[len("gs://"):] else value + "/"  # gs://bucket is a valid prefix here
    errors = PipelineOptionsValidator(None, None).validate_gcs_path(SimpleNamespace(path=probe), "path")
    if errors:
        raise _usage_error(f"{flag} {value!r}: not a valid gs:// path "
                           "(bucket names: 3 or more of lowercase letters, digits, '-', '_', '.')")


def _flag_value(argv: list[str], name: str) -> str | None:
    """Last value of --name / --name=value in a passthrough argv (None if absent)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def default_job_name(run_id: str | None, now: float | None = None) -> str:
    if run_id:
        tail = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    else:
        tail = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"batch-caption-{tail}" if tail else "batch-caption"


def gpu_service_option(gpu: str) -> str:
    """'nvidia-tesla-t4:2' -> 'worker_accelerator=type:nvidia-tesla-t4;count:2;install-nvidia-driver'."""
    m = _GPU_RE.match(gpu.strip().lower())
    if not m:
        raise _usage_error(f"--gpu {gpu!r}: expected TYPE[:COUNT], e.g. nvidia-tesla-t4:1 or nvidia-l4:1")
    return f"worker_accelerator=type:{m['type']};count:{m['count'] or 1};install-nvidia-driver"


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args, passthrough = build_parser().parse_known_args(argv)
    for flag in ("--runner", "--setup_file"):
        if _flag_value(passthrough, flag) is not None:
            raise _usage_error(f"{flag} is set by this launcher; do not pass it")
    return args, passthrough


def assemble(argv: list[str]) -> list[str]:
    """Launcher argv -> argv for batch_caption.run (no cloud call). Raises UsageError."""
    args, passthrough = _parse(argv)
    if not args.input and not args.input_list:
        raise _usage_error("give --input or --input_list (gs:// paths; the bundled samples are not on the workers)")
    for flag, values in (("--input", args.input), ("--input_list", args.input_list)):
        for value in values:
            _require_gs(flag, value)
    output = args.output.rstrip("/")
    _require_gs("--output", output)
    temp = args.temp_location or f"{output}/tmp"
    staging = args.staging_location or f"{output}/staging"
    _require_gs("--temp_location", temp)
    _require_gs("--staging_location", staging)
    if args.model is not None and not _is_bundled(args.model):
        _require_gs("--model", args.model)
    if args.max_num_workers is not None and args.max_num_workers < 1:
        raise _usage_error(f"--max_num_workers must be >= 1, got {args.max_num_workers}")
    job_name = args.job_name or default_job_name(_flag_value(passthrough, "--run_id"))
    if not _JOB_NAME_RE.match(job_name):
        raise _usage_error(f"--job_name {job_name!r} must match [a-z]([-a-z0-9]*[a-z0-9])?")
    if args.gpu and not args.sdk_container_image:
        raise _usage_error("--gpu needs --sdk_container_image: the default worker image has no CUDA-enabled "
                           "TensorFlow (build jobs/Dockerfile with --build-arg GPU=1)")
    if args.no_setup_file and not args.sdk_container_image:
        raise _usage_error("--no_setup_file needs --sdk_container_image (workers must get the package somehow)")

    out = [
        "--runner=DataflowRunner",
        f"--project={args.project}",
        f"--region={args.region}",
        f"--job_name={job_name}",
        f"--temp_location={temp}",
        f"--staging_location={staging}",
        f"--machine_type={args.machine_type}",
    ]
    if args.max_num_workers is not None:
        out.append(f"--max_num_workers={args.max_num_workers}")
    if not args.no_setup_file:
        if not os.path.isfile(SETUP_FILE):
            raise _usage_error(f"{SETUP_FILE} not found: run this launcher from a checkout of the repository")
        out.append(f"--setup_file={SETUP_FILE}")
    if args.sdk_container_image:
        out.append(f"--sdk_container_image={args.sdk_container_image}")
    if args.gpu or args.sdk_container_image:
        out.append("--experiments=use_runner_v2")  # custom containers and GPUs need Runner v2
    if args.gpu:
        out.append(f"--dataflow_service_options={gpu_service_option(args.gpu)}")
    for value in args.input:
        out.append(f"--input={value}")
    for value in args.input_list:
        out.append(f"--input_list={value}")
    out.append(f"--output={output}")
    if args.model is not None:
        out.append(f"--model={args.model}")
    return out + passthrough


def command_line(assembled: list[str]) -> str:
    return shlex.join(["python", "-m", "batch_caption.run", *assembled])


def main(argv: list[str] | None = None) -> int:
    from batch_caption.cli import UsageError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        assembled = assemble(argv)
        dry_run = build_parser().parse_known_args(argv)[0].dry_run
    except UsageError as e:
        print(f"dataflow_caption: error: {e}", file=sys.stderr)
        return 2
    if dry_run:
        print(command_line(assembled))
        return 0
    from batch_caption import run

    return run.main(assembled)


if __name__ == "__main__":
    from batch_caption import quiet

    quiet.setup()  # this command line's --verbose, as run.main does for its own
    sys.exit(main())
