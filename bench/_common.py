"""The harness every benchmark script shares.

- results: `add_out_flags` and `write_report` (the JSON in bench/results/ with the command
  that produced it, the machine and the time; `--fold` stores a variant of a benchmark
  in its file instead of replacing it);
- rounds: `alternate` (every side once per round, so all see the same machine load);
- the job in process: `run_job`, `job_round`, the steady time and the rates derived from it;
- the job in a process of its own: `export_revision`, `run_child` (another package tree
  first on PYTHONPATH), `summary_seconds` (the seconds its summary line gives);
- the model alone: `load_captioner`, `decode`, `ceiling_pass`, `decode_and_caption_pass`,
  `random_model`.

Every import of `batch_caption` that can move with the package's layout is in this module,
inside the function that needs it, so a script's `--help` imports neither Beam nor
TensorFlow.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")


# --- results -------------------------------------------------------------------------

def add_out_flags(parser, name: str) -> None:
    """--out (default bench/results/<name>.json) and --fold."""
    parser.add_argument("--out", default=os.path.join(RESULTS, f"{name}.json"), help="JSON report")
    parser.add_argument("--fold", default=None, metavar="NAME",
                        help="store the report under folded.NAME of --out, keeping the rest of the file "
                             "(a variant of the benchmark: another corpus, other flags)")


def machine() -> dict:
    """What the figures were measured on."""
    info = {"cpus": os.cpu_count(), "platform": sys.platform, "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def _in_repo(value):
    """A path under the checkout -> relative to it (reports name no machine's paths)."""
    if isinstance(value, str) and value.startswith(REPO + os.sep):
        return os.path.relpath(value, REPO)
    return value


def _relative(value):
    """`_in_repo` applied to every string of a report, nested ones included."""
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relative(v) for v in value]
    return _in_repo(value)


def write_report(args, argv, script: str, report: dict) -> dict:
    """Adds the command, machine and time to `report` and writes it to args.out: the whole
    file (keeping its folded runs), or with --fold its folded[NAME] entry. Returns the
    report as written."""
    argv = [_in_repo(a) for a in (sys.argv[1:] if argv is None else argv)]
    full = {"command": shlex.join(["python", f"bench/{script}", *argv]), "machine": machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_relative(report)}
    try:
        with open(args.out) as f:
            existing = json.load(f)
    except (OSError, ValueError):
        existing = {}
    folded = existing.get("folded", {})
    if getattr(args, "fold", None):
        folded[args.fold] = full
        content = {**existing, "folded": folded}
    else:
        content = {**full, "folded": folded} if folded else full
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(content, f, indent=2)
    return full


# --- rounds --------------------------------------------------------------------------

def alternate(rounds: int, sides: dict, log=None) -> dict[str, list]:
    """Calls every side once per round, in order (A B C A B C ...): sides maps a name to
    fn(round) -> a measurement. -> {name: [one measurement per round]}."""
    got: dict[str, list] = {name: [] for name in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            got[name].append(fn(r))
            if log:
                log(r, name, got[name][-1])
    return got


def median(items, key=None) -> float:
    return statistics.median(items if key is None else (key(x) for x in items))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def log_round(r: int, side: str, x) -> None:
    """One line on stderr per measurement of `alternate`."""
    if isinstance(x, dict) and "steady_images_per_s" in x:
        x = f"{x['steady_images_per_s']:.1f} img/s steady, {x['wall_images_per_s']:.1f} wall"
    elif isinstance(x, tuple):
        x = f"{x[0]:.1f} img/s"
    elif isinstance(x, float):
        x = f"{x:.1f} img/s"
    say(f"round {r}: {side}: {x}")


# --- the job in this process ---------------------------------------------------------

def model_path(model: str | None = None) -> str:
    """A --model value (a bundled model's name or a bundle path; None: the default bundled
    model) -> the bundle's path."""
    from batch_caption import bundled

    return bundled.resolve(model or bundled.DEFAULT_MODEL_NAME)


def run_job(argv: list[str]) -> dict:
    """One real job run (`python -m batch_caption.run` in this process) -> its manifest."""
    from batch_caption import run

    return run.run(argv)


def job_config(input_dir: str, extra: list[str]):
    """The job's parsed configuration for these flags."""
    from batch_caption import run

    return run.parse(["--input", input_dir, *extra])[0]


def check_variant(input_dir: str, flags: str) -> str | None:
    """Why the job would refuse `flags`, or would run on other inputs or outputs than a
    benchmark gives it; None when it accepts them."""
    from batch_caption import run

    fixed = ["--input", input_dir, "--output", "unset-output", "--run_id", "unset"]
    plain = run.parse(fixed)[0]
    try:
        config = run.parse([*fixed, *shlex.split(flags)])[0]
        run.check_model(config.model)
    except run.UsageError as e:
        return str(e)
    if (config.inputs, config.input_lists, config.output, config.run_id) != (
            plain.inputs, plain.input_lists, plain.output, plain.run_id):
        return "it sets the input, --output or --run_id, which the benchmark sets"
    return None


def steady_seconds(manifest: dict) -> float:
    """A run's seconds without its wait for the model load (the manifest's elapsed_seconds -
    its model_wait_ms): the load runs beside the first decodes, so its CPU stays in."""
    return manifest["elapsed_seconds"] - manifest["metrics"].get("model_wait_ms", 0) / 1000


def read_run(run_dir: str) -> tuple[dict[str, dict], int]:
    """A job's run directory -> ({path: caption record}, number of error records)."""
    records, errors = {}, 0
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "captions-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            records.update((r["path"], r) for r in map(json.loads, f))
    for path in glob.glob(os.path.join(glob.escape(run_dir), "errors-*.jsonl")):
        with open(path, encoding="utf-8") as f:
            errors += sum(1 for _ in f)
    return records, errors


def job_round(input_dir: str, out_dir: str, run_id: str, extra: list[str], captions: bool = False) -> dict:
    """One real job run that must caption every image; -> its timings and counts (and,
    with `captions`, {file name: caption}). Its run directory is deleted."""
    import shutil

    argv = ["--input", input_dir, "--output", out_dir, "--run_id", run_id, *extra]
    start, cpu = time.perf_counter(), time.process_time()
    manifest = run_job(argv)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    counts, metrics = manifest["counts"], manifest["metrics"]
    if counts["failed"] or counts["captioned"] != counts["matched"]:
        raise SystemExit(f"job round {run_id} did not caption every image: {counts}")
    job = {
        "wall_s": wall,
        "cpu_s": cpu,  # every thread of this process: a load-independent measure of work
        "elapsed_s": manifest["elapsed_seconds"],
        "model_load_s": metrics.get("model_load_ms", 0) / 1000.0,  # the load's own time, beside decoding
        "model_wait_s": metrics.get("model_wait_ms", 0) / 1000.0,  # what the run waited for it
        "steady_s": steady_seconds(manifest),
        "captioned": counts["captioned"],
        "batch_size": manifest["options"]["batch_size"],
        "num_inferences": metrics.get("num_inferences", 0),
        "options": manifest["options"],
    }
    job["steady_images_per_s"], job["wall_images_per_s"] = job_rates(job)
    run_dir = os.path.join(out_dir, f"run={run_id}")
    if captions:
        job["captions"] = {os.path.basename(p): r["caption"] for p, r in read_run(run_dir)[0].items()}
    shutil.rmtree(run_dir, ignore_errors=True)
    return job


def job_rates(job: dict) -> tuple[float, float]:
    """(steady, wall) images/s of one job round: steady leaves out the wait for the model."""
    return job["captioned"] / job["steady_s"], job["captioned"] / job["wall_s"]


def median_job_rates(jobs: list[dict]) -> tuple[float, float]:
    """(steady, wall) images/s, each the median over job rounds."""
    steady, wall = zip(*map(job_rates, jobs))
    return statistics.median(steady), statistics.median(wall)


def marginal_rate(big: dict, small: dict) -> float:
    """images/s of the images the bigger of two job runs has beyond the smaller, from their
    steady times: the job's per-image rate without a run's fixed cost (what a run of
    millions of images pays per image)."""
    return (big["captioned"] - small["captioned"]) / (big["steady_s"] - small["steady_s"])


def job_phases() -> list[tuple[object, str, str]]:
    """(class, method, label) of the job's phases, in data-flow order, for
    profile_job.py's timeline."""
    from batch_caption import pipeline

    return pipeline.timed_phases()


# A py-spy frame of the model load's own thread (BackgroundLoad), for profile_job.py summary.
LOAD_THREAD_FRAME = r"(^|;)(BackgroundLoad\.)?_load \([^)]*(inference|model_loading)\.py"


# --- the job in a process of its own --------------------------------------------------

def export_revision(rev: str, dest: str) -> str:
    """The tree of git revision `rev` under dest; -> its commit id."""
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                            text=True)
    if commit.returncode != 0:
        raise SystemExit(f"{rev}: not a commit of this repository")
    archive = subprocess.run(["git", "-C", REPO, "archive", commit.stdout.strip()], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return commit.stdout.strip()


def child_env(package_root: str | None = None) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if package_root:
        env["PYTHONPATH"] = package_root
    return env


def summary_seconds(log: str, prefix: str = "run=") -> float:
    """The seconds a process's last summary line gives ("PREFIX... in 9.3 s (..."); the
    job's ("run=...") counts from flags to manifest, the model load included."""
    with open(log) as f:
        found = re.findall(rf"^{re.escape(prefix)}.* in ([0-9.]+) s \(", f.read(), re.M)
    if not found:
        raise SystemExit(f"no summary line starting {prefix!r} in {log}")
    return float(found[-1])


def run_child(args: list[str], package_root: str | None = None, cwd: str | None = None) -> str:
    """Runs `python ARGS` in a new process (batch_caption from package_root when given;
    cwd outside the repository so that only PYTHONPATH decides) -> its stdout."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=child_env(package_root))
    if done.returncode != 0:
        raise SystemExit(f"failed (rc {done.returncode}): python {shlex.join(args)[:300]}\n{done.stderr[-2000:]}")
    return done.stdout


# --- the model alone -----------------------------------------------------------------

def load_captioner(model: str, decode=None, **search):
    """The bundle's Captioner as the job loads it; `search` (beam_size, num_alternatives,
    ...) overrides the decode settings."""
    from batch_caption.model.load import load_captioner as load
    from batch_caption.model.config import DecodeConfig

    return load(model, DecodeConfig(**search) if search else decode)


def load_job_model(config):
    """The model exactly as the job's handler loads it for `config` (a parsed JobConfig):
    its runtime (LiteRT's compiled graph by default, split over its replicas) and its
    search settings. It has the TF Captioner's `caption`, `image_size` and `model_id`."""
    from batch_caption import bundled
    from batch_caption.core.inference import CaptionModelHandler

    return CaptionModelHandler(bundled.portable(config.model), config.decode, config.batch_size or 32,
                               runtime=config.runtime).load_now()


def with_search(captioner, **search):
    """The same model with other decode settings."""
    from batch_caption.model.config import DecodeConfig

    return captioner.with_decode(DecodeConfig(**search))


def decode(data: bytes, image_size: int, draft: bool = True):
    """The job's decoding of one file's bytes -> uint8 [S, S, 3]."""
    from batch_caption.images import decoding

    return decoding.decode_image(data, decoding.ImageConfig(image_size=image_size, draft=draft)).pixels


def scene_batch(n: int, size: int):
    """n fixed synthetic test scenes of size x size, uint8 [n, size, size, 3]."""
    import numpy as np

    from batch_caption.data import scenes

    config = scenes.SceneConfig(image_size=size)
    return np.stack([np.asarray(scenes.render_scene(s, config))
                     for s in scenes.generate_scenes("test", n, seed=7, config=config)])


def ceiling_pass(captioner, pixels, batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds to caption every image of `pixels` in batches of `batch`
    (the last one partial)."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(pixels), batch):
        captioner.caption(pixels[i : i + batch])  # a slice is a view: no copy
    return time.perf_counter() - start, time.process_time() - cpu


def decode_and_caption_pass(captioner, datas: list[bytes], image_size: int, draft: bool, batch: int,
                            threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds to decode `datas` in `threads` threads (in order, all submitted at
    once) while this thread captions them in batches of `batch`: the job's work minus Beam."""
    import numpy as np

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        pending = []
        for pixels in pool.map(lambda data: decode(data, image_size, draft), datas):
            pending.append(pixels)
            if len(pending) == batch:
                captioner.caption(np.stack(pending))
                pending = []
        if pending:
            captioner.caption(np.stack(pending))
    return time.perf_counter() - start, time.process_time() - cpu


USUAL_SIZE = {
    "small_cnn": 128,
    "mobilenet_v3_small": 224,
    "mobilenet_v3_large": 224,
    "efficientnet_b0": 224,
    "inception_v3": 299,
    "resnet50": 224,
}


def encoder_names(parser, text: str | None) -> list[str]:
    """A comma-separated --encoders value (None: all) -> names; an unknown one is a usage error."""
    from batch_caption.model.config import ENCODERS

    names = list(ENCODERS) if text is None else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENCODERS]
    if unknown or not names:
        parser.error(f"unknown encoder(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ENCODERS)}")
    return names


def random_model(name: str):
    """(ShowAndTell with random weights, Vocabulary, the default bundled model's ModelConfig)
    for encoder `name` at its usual input side, with that model's decoder; no download."""
    from batch_caption.model.config import ModelConfig
    from batch_caption.model.show_and_tell import ShowAndTell
    from batch_caption.model.vocab import Vocabulary

    def read(name: str) -> bytes:
        with open(os.path.join(model_path(), name), "rb") as f:
            return f.read()

    base = ModelConfig.from_dict(json.loads(read("config.json")))
    vocabulary = Vocabulary.from_json(read("vocab.json").decode())
    config = ModelConfig(
        vocab_size=len(vocabulary), encoder=name, image_size=USUAL_SIZE[name], encoder_weights=None,
        train_encoder=False, image_input=base.image_input, embedding_size=base.embedding_size,
        lstm_units=base.lstm_units, max_length=base.max_length,
    )
    model = ShowAndTell(config)
    model.build_all()
    return model, vocabulary, base


def save_bundle(model, vocabulary, path: str) -> str:
    """Writes a model bundle as training exports one."""
    from batch_caption.model import bundle

    return bundle.save_bundle(model, vocabulary, path)


def model_image_size(model: str) -> tuple[str, int]:
    """(bundle id, input side) of a bundle, checked as the job checks it."""
    from batch_caption.model.bundle import verify_bundle

    manifest, config = verify_bundle(model)
    return manifest["bundle_id"], config.image_size
