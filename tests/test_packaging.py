"""The built wheel works on its own: it holds every bundled model and sample image, and the
job runs from an installation of it (not from the checkout).

The wheel goes into a fresh virtualenv that sees this environment's third-party packages
(TensorFlow, Beam, ...) but not its editable install of batch_caption: the parent's
site-packages is appended to the child's sys.path with its .pth files processed, except
the editable install's (its import finder would map `batch_caption` back to the checkout).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from batch_caption import bundled

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "batch_caption"
BUNDLE_FILES = ("bundle.json", "config.json", "vocab.json", "model.weights.h5")
NO_DEFAULT_MODEL = f"the repo has no batch_caption/{bundled.default().directory}/bundle.json yet"

pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _samples() -> list[str]:
    """The default model's sample images: what the job captions with no flags."""
    return [os.path.basename(p) for p in bundled.default().sample_files()]


def _shipped_data() -> list[str]:
    """Every sample image and every installed bundled model's files, as package paths."""
    samples = [f"batch_caption/{p.relative_to(PKG).as_posix()}" for p in sorted((PKG / "samples").rglob("*"))
               if p.is_file() and not p.name.startswith(".")]
    models = [f"batch_caption/{m.directory}/{f}" for m in bundled.BUNDLED.values() if m.installed() for f in BUNDLE_FILES]
    return samples + models


def _has_default_model() -> bool:
    return bundled.default().installed()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def wheel(work) -> Path:
    """A wheel built from a copy of the build inputs (the checkout gets no build/ or egg-info)."""
    src = work / "src"
    src.mkdir()
    for entry in REPO.iterdir():
        if entry.is_file():
            shutil.copy2(entry, src / entry.name)
    shutil.copytree(PKG, src / "batch_caption", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
        check=True, cwd=work, env=_clean_env(), timeout=300,
    )
    (whl,) = out.glob("batch_caption-*.whl")
    return whl


_PARENT_SITE = '''"""Written by tests/test_packaging.py: appends the parent environment's site-packages,
processing its .pth files except those of an editable batch_caption install."""
import os
import site
import sys

PARENTS = {parents!r}
REPO = {repo!r}


def install():
    for d in PARENTS:
        if d in sys.path or not os.path.isdir(d):
            continue
        sys.path.append(d)
        for name in sorted(os.listdir(d)):
            if not name.endswith(".pth") or name.startswith("__editable__"):
                continue
            with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                if REPO in f.read():
                    continue
            site.addpackage(d, name, None)
'''


def _parent_install_files(site_dirs) -> dict[str, float]:
    """{path: mtime} of the parent environment's batch_caption install files."""
    found = {}
    for d in site_dirs:
        for path in glob.glob(os.path.join(d, "*batch_caption*")) + glob.glob(os.path.join(d, "batch_caption*", "*")):
            found[path] = os.stat(path).st_mtime
    return found


@pytest.fixture(scope="module")
def child(work, wheel) -> dict:
    """A fresh virtualenv with the wheel installed: {'python', 'bin', 'site'}."""
    parent_sites = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    root = work / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(root)
    bindir = root / ("Scripts" if os.name == "nt" else "bin")
    python = str(bindir / ("python.exe" if os.name == "nt" else "python"))
    env = _clean_env()
    site_dir = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True, env=env, cwd=work).stdout.strip()
    Path(site_dir, "_bc_parent_site.py").write_text(_PARENT_SITE.format(parents=parent_sites, repo=str(REPO)))
    Path(site_dir, "_bc_parent_site.pth").write_text("import _bc_parent_site; _bc_parent_site.install()\n")
    before = _parent_install_files(parent_sites)
    # --force-reinstall: pip sees the parent's batch_caption too; it never uninstalls outside
    # the child's prefix ("Not uninstalling ... outside environment"), which is checked below.
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index",
                    "--disable-pip-version-check", "-q", str(wheel)],
                   check=True, env=env, cwd=work, timeout=300)
    assert _parent_install_files(parent_sites) == before, "pip touched the parent environment's batch_caption"
    return {"python": python, "bin": bindir, "site": site_dir}


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _samples() and all(s.endswith((".png", ".jpg")) for s in _samples())
    assert [m for m in bundled.BUNDLED.values() if m.installed()]
    missing = [s for s in _shipped_data() if s not in names]
    assert not missing, f"samples or bundled models missing from the wheel: {missing}"
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "batch-caption = batch_caption.run:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_metadata_names_the_supported_pythons(wheel):
    """Requires-Python and the classifiers agree: 3.11, 3.12 and 3.13, and this interpreter."""
    from packaging.specifiers import SpecifierSet

    with zipfile.ZipFile(wheel) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        lines = whl.read(name).decode().splitlines()
    (requires,) = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Python:")]
    supported = SpecifierSet(requires)
    assert [v for v in ("3.10", "3.11", "3.12", "3.13", "3.14") if v in supported] == ["3.11", "3.12", "3.13"]
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in supported
    prefix = "Classifier: Programming Language :: Python :: 3."
    minors = {ln.rsplit("::", 1)[1].strip() for ln in lines if ln.startswith(prefix)}
    assert minors == {"3.11", "3.12", "3.13"}


# What Beam's Cloud Storage filesystem imports (apache_beam.io.gcp.gcsio, gcsfilesystem,
# internal.gcp.auth), and apitools, whose absence `import apache_beam` logs: the part of
# apache-beam[gcp] that the base install takes.
GCS_PACKAGES = {"google-cloud-storage", "google-cloud-core", "google-api-core", "google-auth", "google-auth-httplib2",
                "google-apitools"}


def _requirements() -> list:
    from packaging.requirements import Requirement

    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [Requirement(ln) for ln in lines if ln.strip() and not ln.startswith("#")]


def _without_extra_marker(requirement) -> str:
    """'name<spec; python_version < "3.13"' of a requirement, its `extra == ...` dropped."""
    marker = str(requirement.marker or "")
    marker = re.sub(r'\s*and\s+extra == "[^"]+"|extra == "[^"]+"\s*(and\s+)?', "", marker).strip()
    return f"{requirement.name}{requirement.specifier}" + (f"; {marker}" if marker else "")


def test_base_requirements_take_only_beams_gcs_part_of_its_gcp_extra():
    """Beam itself without [gcp]; of [gcp], the GCS filesystem's packages, each in the range
    and under the markers that Beam's [gcp] extra gives it (installed Beam's metadata)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    reqs = _requirements()
    (beam,) = [r for r in reqs if r.name == "apache-beam"]
    assert not beam.extras, f"requirements.txt has apache-beam{sorted(beam.extras)}: that is the dataflow extra"
    gcp = [r for r in map(Requirement, requires("apache-beam")) if 'extra == "gcp"' in str(r.marker or "")]
    taken = sorted(str(r) for r in reqs if r.name in GCS_PACKAGES)
    assert {r.name for r in reqs} & GCS_PACKAGES == GCS_PACKAGES
    assert taken == sorted(_without_extra_marker(r) for r in gcp if r.name in GCS_PACKAGES)
    assert not {r.name for r in reqs} & ({r.name for r in gcp} - GCS_PACKAGES), "more of [gcp] than GCS needs"


def test_wheel_metadata_has_the_dataflow_extra(wheel):
    """`dataflow` = apache-beam[gcp] in the base's Beam range; `test` leaves it out, so the
    suite runs on the base install."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        lines = whl.read(name).decode().splitlines()
    assert "Provides-Extra: dataflow" in lines
    requires = [Requirement(ln.split(":", 1)[1].strip()) for ln in lines if ln.startswith("Requires-Dist:")]
    by_extra: dict[str, list] = {}
    for r in requires:
        extra = re.search(r'extra == "([^"]+)"', str(r.marker or ""))
        by_extra.setdefault(extra.group(1) if extra else "", []).append(r)
    (base_beam,) = [r for r in by_extra[""] if r.name == "apache-beam"]
    (dataflow,) = by_extra["dataflow"]
    assert not base_beam.extras and dataflow.name == "apache-beam" and dataflow.extras == {"gcp"}
    assert dataflow.specifier == base_beam.specifier
    assert not [r for r in by_extra["test"] if r.name == "apache-beam"]


def test_sdist_for_dataflow_setup_file(wheel, work):
    """Dataflow workers install the sdist Beam builds from --setup_file (`setup.py sdist`,
    as Beam 2.77's stager does without the `build` package): it must carry the samples
    and the bundled models too."""
    src, out = work / "src", work / "sdist"
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)], check=True, cwd=src,
                   env=_clean_env(), capture_output=True, timeout=300)
    (sdist,) = out.glob("batch_caption-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"setup.py", "requirements.txt", "README.md"} <= names
    missing = [s for s in _shipped_data() if s not in names]
    assert not missing, f"samples or bundled models missing from the sdist: {missing}"


def test_child_imports_the_wheel_not_the_checkout(child, work):
    probe = ("import json, batch_caption, batch_caption.run, apache_beam; from batch_caption import bundled;"
             "print(json.dumps([batch_caption.__file__, bundled.default().samples_dir, bundled.default().path]))")
    done = subprocess.run([child["python"], "-c", probe], capture_output=True, text=True, env=_clean_env(),
                          cwd=work, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    package_file, samples_dir, _ = json.loads(done.stdout.strip().splitlines()[-1])
    site_dir = os.path.realpath(child["site"])
    assert os.path.realpath(package_file).startswith(site_dir + os.sep), package_file
    assert not os.path.realpath(package_file).startswith(str(REPO) + os.sep)
    assert sorted(n for n in os.listdir(samples_dir) if os.path.isfile(os.path.join(samples_dir, n))) == _samples()
    script = child["bin"] / "batch-caption"
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=_clean_env(), cwd=work,
                            timeout=120)
    assert helped.returncode == 0 and "--input" in helped.stdout, helped.stderr[-2000:]


def test_installed_job_captions_bundled_samples(child, work, request):
    """`python -m batch_caption.run --output OUT`: the default model's samples, with it, from
    the installed wheel. Until the repo has its default model, the same run with a tiny test
    bundle still checks the installed job and samples; the bundled-model part is skipped."""
    out = work / "out"
    argv = [child["python"], "-m", "batch_caption.run", "--output", str(out), "--run_id", "pkg"]
    expected_model = None
    if _has_default_model():
        expected_model = bundled.default().bundle_id()
    else:
        argv += ["--model", request.getfixturevalue("tiny_bundle")]
    done = subprocess.run(argv, capture_output=True, text=True, env=_clean_env(), cwd=work, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = out / "run=pkg"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    records = [json.loads(line) for f in sorted(run_dir.glob("captions-*.jsonl")) for line in f.read_text().splitlines()]
    errors = [line for f in run_dir.glob("errors-*.jsonl") for line in f.read_text().splitlines()]
    assert not errors
    assert sorted(os.path.basename(r["path"]) for r in records) == _samples()
    samples_dir = os.path.realpath(os.path.join(child["site"], "batch_caption", bundled.default().samples))
    assert all(os.path.realpath(os.path.dirname(r["path"])) == samples_dir for r in records)
    assert all(r["caption"] for r in records)
    assert manifest["counts"]["captioned"] == len(_samples()) and manifest["counts"]["failed"] == 0
    if expected_model is None:
        pytest.skip(f"bundled-model run not checked: {NO_DEFAULT_MODEL}")
    assert manifest["model"] == expected_model and {r["model"] for r in records} == {expected_model}
