"""The captioning job end to end: every input accounted for, on every runner mode."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import varied_images, within
from PIL import Image

from batch_caption import bundled, quality, run
from batch_caption.images import decoding
from batch_caption.model.config import DecodeConfig
from batch_caption.model.load import load_captioner
from batch_caption.pipeline.config import default_batch_size
from batch_caption.pipeline.progress import Reporter

BROKEN = {  # name -> expected stage
    "zero.jpg": "decode",
    "truncated.jpg": "decode",
    "text.jpg": "decode",
    "random.png": "decode",
    "bomb.png": "decode",
}
# Files beside the images that are not inputs: skipped unopened, or (no extension) sniffed.
NOT_IMAGES = {"notes.txt": b"not an image\n", "IMG_0001.xmp": b"<x:xmpmeta/>", "Thumbs.db": b"\xd0\xcf\x11\xe0",
              ".DS_Store": b"\x00\x00\x00\x01Bud1", "README": b"photos of 2026\n", "sub/dir/meta.json": b"{}"}


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_mixed_folder(root) -> tuple[dict[str, str], list[str]]:
    """Writes valid images of many formats, modes and sizes (some named in capitals or
    without an extension), broken ones, and files that are not images (NOT_IMAGES).

    Returns ({input path: 'valid'|stage}, the valid paths).
    """
    os.makedirs(root, exist_ok=True)
    px = varied_images(12, 120, seed=42)
    rgb = [Image.fromarray(p) for p in px]
    files: dict[str, bytes] = {
        "plain.jpg": _encode(rgb[0], "JPEG"),
        "with space.png": _encode(rgb[1], "PNG"),
        "ünïcødé-图像.png": _encode(rgb[2].convert("L"), "PNG"),
        "new\nline.png": _encode(rgb[3].convert("P"), "PNG"),
        "alpha.png": _encode(rgb[4].convert("RGBA"), "PNG"),
        "grey-alpha.png": _encode(rgb[5].convert("LA"), "PNG"),
        "cmyk.jpg": _encode(rgb[6].convert("CMYK"), "JPEG"),
        "photo.webp": _encode(rgb[7], "WEBP"),
        "old.bmp": _encode(rgb[8], "BMP"),
        "scan.tiff": _encode(rgb[9], "TIFF"),
        "anim.gif": _encode(rgb[10], "GIF", save_all=True, append_images=[rgb[11]], duration=100, loop=0),
        "deep16.png": _encode(Image.fromarray((px[0][:, :, 0].astype(np.uint16) * 257)), "PNG"),
        "tall.jpg": _encode(rgb[1].resize((30, 400)), "JPEG"),
        "big.jpg": _encode(rgb[2].resize((2400, 1600)), "JPEG", quality=80),
        "tiny.png": _encode(rgb[3].resize((1, 1)), "PNG"),
        "copy_a.png": _encode(rgb[5], "PNG"),
        "copy_b.png": _encode(rgb[5], "PNG"),
        "sub/dir/nested.jpg": _encode(rgb[6], "JPEG"),
        "photo.jpg/inside.png": _encode(rgb[7], "PNG"),  # a directory named like an image
        "UPPER.JPG": _encode(rgb[9], "JPEG"),
        "IMG_0042": _encode(rgb[10], "JPEG"),  # no extension: its bytes say it is an image
        # broken
        "zero.jpg": b"",
        "truncated.jpg": _encode(rgb[8], "JPEG")[:300],
        "text.jpg": b"this is not an image\n",
        "random.png": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "bomb.png": _encode(Image.new("1", (12000, 12000)), "PNG"),  # 144 MP, ~20 KB
    }
    expected = {}
    for name, data in {**files, **NOT_IMAGES}.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        if name in files:
            expected[path] = BROKEN.get(name, "valid")
    valid = [p for p, s in expected.items() if s == "valid"]
    return expected, valid


def read_run(run_dir):
    captions, errors = [], []
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "captions-*.jsonl"))):
        captions += [json.loads(line) for line in open(path, encoding="utf-8")]
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "errors-*.jsonl"))):
        errors += [json.loads(line) for line in open(path, encoding="utf-8")]
    with open(os.path.join(run_dir, "manifest.json")) as f:
        manifest = json.load(f)
    return captions, errors, manifest


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mixed") / "in")
    return (root, *make_mixed_folder(root))


@pytest.fixture(scope="module")
def in_memory_run(mixed, tiny_bundle, tmp_path_factory):
    root, _, _ = mixed
    out = str(tmp_path_factory.mktemp("out"))
    manifest = run.run(["--input", root, "--output", out, "--model", tiny_bundle, "--run_id", "mem", "--batch_size", "4"])
    return out, manifest


def test_every_input_path_appears_exactly_once(mixed, in_memory_run):
    _, expected, valid = mixed
    out, manifest = in_memory_run
    captions, errors, written = read_run(os.path.join(out, "run=mem"))
    paths = [r["path"] for r in captions] + [r["path"] for r in errors]
    assert sorted(paths) == sorted(expected)
    assert {r["path"] for r in captions} == set(valid)
    for r in errors:
        assert r["stage"] == expected[r["path"]]
        assert r["error"] and r["message"] and r["run_id"] == "mem"
    for r in captions:
        assert r["caption"].strip()
        assert r["width"] > 0 and r["height"] > 0 and len(r["sha256"]) == 64
    by_path = {r["path"]: r for r in captions}
    assert by_path[os.path.join(mixed[0], "big.jpg")]["width"] == 2400
    copy_bytes = open(os.path.join(mixed[0], "copy_a.png"), "rb").read()
    assert open(os.path.join(mixed[0], "copy_b.png"), "rb").read() == copy_bytes
    for name in ("copy_a.png", "copy_b.png"):  # the hash of the bytes, computed here
        assert by_path[os.path.join(mixed[0], name)]["sha256"] == hashlib.sha256(copy_bytes).hexdigest()
    assert written == {k: v for k, v in manifest.items() if k not in ("elapsed_seconds", "metrics")}
    counts = manifest["counts"]
    assert counts["captioned"] == len(captions) and counts["failed"] == len(errors)
    assert counts["inputs"] == counts["matched"] == len(expected)
    assert counts["failed_by_stage"]["decode"] == len(BROKEN)
    assert counts["skipped_not_image"] == len(NOT_IMAGES) and counts["carried_not_image"] == 0
    assert sorted(counts["flagged"]) == sorted(quality.FLAGS)
    for flag, n in counts["flagged"].items():
        assert n == sum(flag in r["flags"] for r in captions)


def test_error_records_say_what_went_wrong(mixed, in_memory_run):
    out, _ = in_memory_run
    _, errors, _ = read_run(os.path.join(out, "run=mem"))
    kinds = {os.path.basename(r["path"]): r["error"] for r in errors}
    assert kinds == {
        "zero.jpg": "EmptyImageError",
        "truncated.jpg": "TruncatedImageError",
        "text.jpg": "UnsupportedImageError",
        "random.png": "UnsupportedImageError",
        "bomb.png": "ImageTooLargeError",
    }


def test_model_is_loaded_once_per_process(in_memory_run):
    _, manifest = in_memory_run
    m = manifest["metrics"]
    assert m["captioned"] == manifest["counts"]["captioned"] > 4  # several batches of 4
    assert m["model_loads"] == 1
    assert 0 < m["model_load_ms"] < manifest["elapsed_seconds"] * 1000  # load + trace, for benchmarks


def test_job_captions_equal_the_captioners(mixed, in_memory_run, tiny_bundle):
    _, _, valid = mixed
    out, _ = in_memory_run
    captions, _, _ = read_run(os.path.join(out, "run=mem"))
    captioner = load_captioner(tiny_bundle, DecodeConfig())
    config = decoding.ImageConfig(image_size=captioner.image_size)
    pixels = np.stack([decoding.decode_image(open(p, "rb").read(), config).pixels for p in valid])
    direct = {p: row for p, row in zip(valid, captioner.caption(pixels))}
    for r in captions:
        best, *alts = direct[r["path"]]
        assert r["caption"] == best.text
        assert r["score"] == pytest.approx(best.score, abs=1e-4)
        assert [a["caption"] for a in r["alternatives"]] == [a.text for a in alts]


@pytest.mark.slow
def test_multi_processing_runner_gives_the_same_records(mixed, in_memory_run, tiny_bundle, tmp_path):
    root, _, _ = mixed
    out, _ = in_memory_run
    run.run(["--input", root, "--output", str(tmp_path), "--model", tiny_bundle, "--run_id", "mp", "--batch_size", "4",
             "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    mem_caps, mem_errs, _ = read_run(os.path.join(out, "run=mem"))
    mp_caps, mp_errs, manifest = read_run(str(tmp_path / "run=mp"))

    def key(records, *fields):
        return sorted(tuple(r[f] for f in fields) for r in records)

    assert key(mp_caps, "path", "caption", "sha256") == key(mem_caps, "path", "caption", "sha256")
    assert key(mp_errs, "path", "stage", "error") == key(mem_errs, "path", "stage", "error")
    assert manifest["counts"]["inputs"] == len(mp_caps) + len(mp_errs)
    assert manifest["counts"]["skipped_not_image"] == len(NOT_IMAGES)


def test_inline_reading_without_dedupe_gives_the_same_records(mixed, in_memory_run, tiny_bundle, tmp_path):
    root, _, _ = mixed
    out, _ = in_memory_run
    manifest = run.run(["--input", root, "--output", str(tmp_path), "--model", tiny_bundle, "--run_id", "inline",
                        "--batch_size", "4", "--read_threads", "0", "--no-dedupe"])
    mem_caps, mem_errs, _ = read_run(os.path.join(out, "run=mem"))
    caps, errs, _ = read_run(str(tmp_path / "run=inline"))

    def key(records, *fields):
        return sorted(tuple(r[f] for f in fields) for r in records)

    assert key(caps, "path", "caption", "sha256", "bytes") == key(mem_caps, "path", "caption", "sha256", "bytes")
    assert key(errs, "path", "stage", "error", "message") == key(mem_errs, "path", "stage", "error", "message")
    assert manifest["options"]["read_threads"] == 0 and manifest["options"]["dedupe"] is False


def test_rerun_with_the_same_run_id_leaves_no_stale_shards(tiny_bundle, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, px in enumerate(varied_images(5, 64, seed=9)):
        Image.fromarray(px).save(src / f"{i}.png")
    args = ["--input", str(src), "--output", str(tmp_path / "out"), "--model", tiny_bundle, "--run_id", "same"]
    run.run(args)
    run_dir = tmp_path / "out" / "run=same"
    # An earlier attempt with another shard count, and temp files of crashed writes.
    (run_dir / "captions-00001-of-00002.jsonl").write_text('{"path": "stale"}\n')
    (run_dir / "beam-temp-captions-x").mkdir()
    (run_dir / "beam-temp-captions-x" / "part").write_text("junk")
    (run_dir / "_temporary").mkdir()
    (run_dir / "_temporary" / "captions-0123.jsonl").write_text('{"path": "a failed attempt"}\n')
    (src / "0.png").unlink()
    manifest = run.run(args)
    captions, errors, _ = read_run(str(run_dir))
    assert sorted(r["path"] for r in captions) == sorted(str(p) for p in src.iterdir())
    on_disk = sorted(f for f in os.listdir(run_dir) if os.path.isfile(run_dir / f) and f != "manifest.json")
    assert on_disk == sorted(manifest["files"]["captions"] + manifest["files"]["errors"] + manifest["files"]["catalog"])
    assert manifest["counts"]["captioned"] == len(captions) == 4 and not errors
    assert not list(glob.glob(str(run_dir / "beam-temp-*" / "*")))
    assert not os.path.exists(run_dir / "_temporary")


def test_another_run_id_never_touches_earlier_runs(tiny_bundle, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(varied_images(1, 64)[0]).save(src / "a.png")
    out = str(tmp_path / "out")
    run.run(["--input", str(src), "--output", out, "--model", tiny_bundle, "--run_id", "one"])
    before = {f: open(f, "rb").read() for f in glob.glob(os.path.join(out, "run=one", "*"))}
    run.run(["--input", str(src), "--output", out, "--model", tiny_bundle, "--run_id", "two"])
    assert {f: open(f, "rb").read() for f in glob.glob(os.path.join(out, "run=one", "*"))} == before


def test_input_lists_and_globs_are_deduplicated(tiny_bundle, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, px in enumerate(varied_images(3, 64, seed=2)):
        Image.fromarray(px).save(src / f"{i}.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{src / '0.png'}\n{src / '1.png'}\n\n{src / 'missing.png'}\n")
    manifest = run.run(["--input", str(src / "*.png"), "--input", str(src / "0.png"), "--input_list", str(listing),
                        "--output", str(tmp_path / "out"), "--model", tiny_bundle, "--run_id", "d"])
    captions, errors, _ = read_run(str(tmp_path / "out" / "run=d"))
    assert sorted(r["path"] for r in captions) == sorted(str(src / f"{i}.png") for i in range(3))
    assert [(r["path"], r["stage"], r["error"]) for r in errors] == [(str(src / "missing.png"), "read", "FileNotFoundError")]
    assert manifest["counts"]["matched"] == 4


def test_a_glob_that_matches_a_directory_reports_it(tiny_bundle, tmp_path):
    (tmp_path / "in" / "x.jpg").mkdir(parents=True)
    Image.fromarray(varied_images(1, 64)[0]).save(tmp_path / "in" / "y.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'in' / 'x.jpg'}\n{tmp_path / 'in' / 'y.jpg'}\n")
    run.run(["--input_list", str(listing), "--output", str(tmp_path / "out"), "--model", tiny_bundle, "--run_id", "g"])
    captions, errors, _ = read_run(str(tmp_path / "out" / "run=g"))
    assert [r["path"] for r in captions] == [str(tmp_path / "in" / "y.jpg")]
    assert [(r["path"], r["stage"]) for r in errors] == [(str(tmp_path / "in" / "x.jpg"), "read")]


def test_gcs_in_and_out_through_the_emulator(gcs_emulator, tiny_bundle, tmp_path):
    from google.cloud import storage

    client = storage.Client.create_anonymous_client()
    bucket = client.bucket(gcs_emulator)
    names = []
    for i, px in enumerate(varied_images(4, 64, seed=5)):
        blob = bucket.blob(f"photos/day1/{i}.png")
        blob.upload_from_string(_encode(Image.fromarray(px), "PNG"), content_type="image/png")
        names.append(f"gs://{gcs_emulator}/photos/day1/{i}.png")
    bucket.blob("photos/broken.jpg").upload_from_string(b"nope")
    bucket.blob("photos/day1/notes.txt").upload_from_string(b"not an image: skipped")
    bucket.blob("lists/paths.txt").upload_from_string(f"{names[0]}\ngs://{gcs_emulator}/photos/broken.jpg\n")
    out = f"gs://{gcs_emulator}/captions"
    manifest = run.run(["--input", f"gs://{gcs_emulator}/photos/day1/", "--input_list", f"gs://{gcs_emulator}/lists/paths.txt",
                        "--output", out, "--model", tiny_bundle, "--run_id", "gcs"])
    assert manifest["counts"] == {**manifest["counts"], "captioned": 4, "failed": 1, "matched": 5,
                                  "skipped_not_image": 1}
    blobs = {b.name: b for b in client.list_blobs(gcs_emulator, prefix="captions/run=gcs/")}
    manifest_blob = blobs.pop("captions/run=gcs/manifest.json")
    shard_names = sorted(n.rsplit("/", 1)[1] for n in blobs)
    assert shard_names == sorted(manifest["files"]["captions"] + manifest["files"]["errors"] + manifest["files"]["catalog"])
    # The catalog, written through the GCS filesystem, reads back: one row per matched file.
    import pyarrow.parquet as pq

    rows = [r for n, b in blobs.items() if "/catalog-" in n for r in pq.read_table(io.BytesIO(b.download_as_bytes())).to_pylist()]
    assert sorted(r["status"] for r in rows) == ["captioned"] * 4 + ["failed"]
    assert all(manifest_blob.updated >= b.updated for b in blobs.values())  # written last
    lines = [json.loads(x) for n, b in blobs.items() if "/captions-" in n for x in b.download_as_text().splitlines()]
    assert sorted(r["path"] for r in lines) == sorted(names)


# --- the command line ------------------------------------------------------------------


def _cli(*args, timeout=120):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "batch_caption.run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--beam_sise", "3"], "unknown option --beam_sise (did you mean --beam_size?)"),
        (["--runner=DirectRunner", "--no_such_beam_flag=1"], "unknown option --no_such_beam_flag; see --help"),
        (["--model", "/nonexistent/bundle"], "--model /nonexistent/bundle"),
        (["--model", "nonexistent"], "--model nonexistent: no such bundle directory, nor a bundled model (scenes"),
        (["--model", "bundled:nonexistent"], "--model bundled:nonexistent: no bundled model 'nonexistent'"),
        (["--input", "/nonexistent/*.jpg"], "matches no file"),
        (["--beam_size", "0"], "beam_size"),
        (["--beam_size", "two"], "invalid int value"),
        (["--read_threads", "-1"], "--read_threads must be >= 0, got -1"),
        (["--run_id", "a/b"], "--run_id"),
        (["--input_list", "/nonexistent/list.txt"], "does not exist"),
        (["--extensions", ""], "--extensions '': no extension given"),
        (["--extensions", "jpg,,png"], "--extensions 'jpg,,png': an empty item"),
        (["--extensions", "*.jpg"], "'*.jpg' is not a file name extension"),
        (["--extensions", "jpg", "--all_files"], "argument --all_files: not allowed with argument --extensions"),
    ],
)
def test_bad_command_lines_fail_fast_with_one_line(args, message, tiny_bundle, tmp_path, capsys):
    full = ["--output", str(tmp_path / "out")] + (["--model", tiny_bundle] if "--model" not in args else []) + args
    if "--input" not in args and "--input_list" not in args:
        full += ["--input", str(tmp_path)]
        Image.fromarray(varied_images(1, 32)[0]).save(tmp_path / "a.png")
    assert run.main(full) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()  # no work started


@pytest.mark.parametrize("inside", ["out", "out/photos", "out/photos/*.png"])
def test_an_input_inside_the_output_fails_fast_with_one_line(inside, tiny_bundle, tmp_path, capsys):
    (tmp_path / "out" / "photos").mkdir(parents=True)
    Image.fromarray(varied_images(1, 32)[0]).save(tmp_path / "out" / "photos" / "a.png")
    args = ["--input", str(tmp_path / inside), "--output", str(tmp_path / "out"), "--model", tiny_bundle]
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lies inside --output" in err


def test_an_input_list_that_is_a_fifo_fails_fast_with_one_line(tiny_bundle, tmp_path, capsys):
    os.mkfifo(tmp_path / "list.txt")
    args = ["--input_list", str(tmp_path / "list.txt"), "--output", str(tmp_path / "out"), "--model", tiny_bundle]
    assert within(60, run.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a FIFO (named pipe)" in err


def test_an_output_that_cannot_be_written_fails_fast_with_one_line(tiny_bundle, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    Image.fromarray(varied_images(1, 32)[0]).save(tmp_path / "a.png")
    out = tmp_path / "a_file" / "out"
    assert run.main(["--model", tiny_bundle, "--input", str(tmp_path / "a.png"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--output {out}: cannot write there" in err


def test_a_missing_model_is_reported_without_loading_tensorflow(tmp_path):
    # Checking the bundle needs no TensorFlow (~4 s to import): the error comes first.
    code = ("import sys; from batch_caption import run; "
            f"rc = run.main(['--model', {str(tmp_path / 'none')!r}, '--input', {str(tmp_path)!r}]); "
            "print(rc, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "--model" in done.stderr.strip().splitlines()[-1]


def test_a_bundle_with_swapped_weights_is_refused_before_any_work(tiny_model, tiny_vocab, tiny_bundle, tmp_path, capsys):
    import shutil

    from batch_caption.model.bundle import WEIGHTS, save_bundle
    from batch_caption.model.show_and_tell import ShowAndTell

    other = ShowAndTell(tiny_model.config)  # same architecture, other weights
    other.build_all()
    save_bundle(other, tiny_vocab, str(tmp_path / "other"))
    shutil.copytree(tiny_bundle, tmp_path / "swapped")
    shutil.copyfile(tmp_path / "other" / WEIGHTS, tmp_path / "swapped" / WEIGHTS)  # beside the old bundle.json
    Image.fromarray(varied_images(1, 32)[0]).save(tmp_path / "a.png")
    code = run.main(["--model", str(tmp_path / "swapped"), "--input", str(tmp_path / "a.png"),
                     "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'swapped' / WEIGHTS} is corrupted or replaced" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cpus, local, remote", [(1, 2, 16), (2, 2, 16), (8, 8, 16), (32, 32, 16)])
def test_read_threads_default_to_one_per_cpu_for_local_inputs_and_16_for_remote_ones(tmp_path, monkeypatch, cpus, local, remote):
    from batch_caption.core import cpus as job_cpus

    monkeypatch.setattr(job_cpus, "available_cpus", lambda: cpus)

    def threads(*args):
        return run.parse(list(args))[0].read_threads

    assert threads("--input", str(tmp_path)) == threads("--input", f"file://{tmp_path}") == local
    assert threads("--input", str(tmp_path), "--input", "gs://bucket/photos/*.jpg") == remote
    assert threads("--input_list", "s3://bucket/list.txt") == remote
    assert threads("--input", "gs://bucket/a.jpg", "--read_threads", "0") == 0


def test_the_default_batch_size_holds_the_pixels_per_batch(tiny_bundle, tmp_path):
    assert [default_batch_size(s) for s in (32, 128, 224, 299, 600)] == [128, 128, 41, 23, 8]
    assert run.parse(["--input", str(tmp_path)])[0].batch_size is None  # resolved once the model is known
    Image.fromarray(varied_images(1, 64)[0]).save(tmp_path / "a.png")
    size = load_captioner(tiny_bundle, DecodeConfig()).image_size
    manifest = run.run(["--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "o"), "--model", tiny_bundle,
                        "--run_id", "b"])
    assert manifest["options"]["batch_size"] == default_batch_size(size)
    with pytest.raises(run.UsageError, match="--batch_size must be >= 1"):
        run.parse(["--input", str(tmp_path), "--batch_size", "0"])


def test_draft_flag_turns_jpeg_draft_decoding_off(tmp_path, monkeypatch):
    import apache_beam as beam

    from batch_caption import pipeline

    assert run.parse(["--input", str(tmp_path)])[0].draft is True
    assert run.parse(["--input", str(tmp_path), "--draft"])[0].draft is True
    config = run.parse(["--input", str(tmp_path), "--no-draft"])[0]
    assert config.draft is False
    seen = []

    class Built(Exception):
        pass

    def read_images(image_config, *args, **kwargs):  # only the ImageConfig the job builds matters here
        seen.append(image_config)
        raise Built

    monkeypatch.setattr(pipeline, "ReadImages", read_images)
    with pytest.raises(Built):
        pipeline.build_pipeline(beam.Pipeline(), config, "id", 128, False)
    assert seen[0].draft is False and seen[0].image_size == 128


def test_a_bundled_model_this_installation_lacks_fails_fast_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(bundled.BUNDLED, "absent", bundled.BundledModel("absent", "models/absent", "samples", -1.0))
    assert run.main(["--model", "absent", "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["batch_caption.run: error: --model absent: this installation has no bundled model absent"]


def test_model_takes_a_bundled_models_name_or_its_marker():
    scenes_path = bundled.BUNDLED["scenes"].path
    for value in ("scenes", "bundled:scenes", scenes_path):
        assert run.parse(["--model", value])[0].model == scenes_path
    # The marker of earlier versions' manifests and commands: the default model.
    assert run.parse(["--model", "bundled:default_model"])[0].model == bundled.default().path
    assert run.parse([])[0].model == bundled.default().path


def test_cli_process_exit_codes_and_help(tiny_bundle, tmp_path):
    helped = _cli("--help")
    assert helped.returncode == 0 and "--input" in helped.stdout and "--runner" in helped.stdout
    assert "--extensions" in helped.stdout and "--all_files" in helped.stdout
    assert all(name in helped.stdout for name in bundled.BUNDLED)
    bad = _cli("--model", str(tmp_path / "nothing"), "--input", str(tmp_path))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("batch_caption.run: error: --model")
    Image.fromarray(varied_images(1, 64)[0]).save(tmp_path / "ok.png")
    good = _cli("--model", tiny_bundle, "--input", str(tmp_path / "ok.png"), "--output", str(tmp_path / "o"), "--run_id", "x")
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().splitlines()[-1].startswith("run=x: 1 inputs, 1 captioned, 0 failed")


class _Clocked:
    """A Reporter on a hand-moved clock; `last` is the line it printed last."""

    def __init__(self, total, interval=0.0):
        self.now = 0.0
        self.stream = io.StringIO()
        self.reporter = Reporter(total=total, interval=interval, stream=self.stream, clock=lambda: self.now)

    def add(self, at, n, kind="captioned"):
        self.now = at
        self.reporter.add(n, kind)

    @property
    def last(self):
        return self.stream.getvalue().strip().splitlines()[-1]


def test_progress_line_reports_done_rate_and_eta():
    r = _Clocked(total=10)
    r.add(0.0, 1)
    r.add(1.0, 3)
    assert r.last == "[batch_caption] 4/10 images captioned, 3.0 img/s, ETA 2 s"
    assert "ETA" not in Reporter(total=None).line()


def test_progress_rate_and_eta_leave_out_the_wait_for_the_first_image():
    # 30 s of start-up (model load, first batch), then 10 img/s: the ETA must follow the
    # 10 img/s, not the ~1 img/s that counting from the start would give.
    r = _Clocked(total=1000, interval=5.0)
    r.add(30.0, 1)
    assert r.last == "[batch_caption] 1/1,000 images captioned, first after 30.0 s, ETA ?"
    r.add(40.0, 100)
    assert r.last == "[batch_caption] 101/1,000 images captioned, 10.0 img/s, ETA 90 s"
    r.add(45.0, 899)
    assert r.last.endswith("ETA 0 s")


@pytest.mark.parametrize("dedupe", ["--dedupe", "--no-dedupe"])
def test_the_progress_line_knows_the_total_first_and_reaches_it(mixed, tiny_bundle, tmp_path, monkeypatch, dedupe):
    # The total is known before the first image finishes, and every path counts once,
    # captioned or failed, so the line ends at total/total (and the ETA at 0); a path that
    # two inputs match is one path.
    root, expected, valid = mixed
    seen = []
    add = Reporter.add

    def recording_add(self, n=1, kind="captioned"):
        seen.append((self.total, kind))
        add(self, n, kind)

    monkeypatch.setattr(Reporter, "add", recording_add)
    manifest = run.run(["--input", root, "--input", valid[0], "--output", str(tmp_path), "--model", tiny_bundle,
                        "--run_id", "p", "--batch_size", "4", dedupe])
    counts = manifest["counts"]
    assert counts["captioned"] > 0 and counts["failed"] > 0 and counts["matched"] == len(expected)
    assert {total for total, _ in seen} == {len(expected)}
    kinds = [kind for _, kind in seen]
    assert (kinds.count("captioned"), kinds.count("failed")) == (counts["captioned"], counts["failed"])
    assert len(seen) == len(expected)


def test_progress_line_names_failed_and_skipped_images():
    r = _Clocked(total=10)
    r.add(0.0, 5)
    r.add(1.0, 2, "failed")
    r.add(1.0, 3, "skipped")
    assert r.last == "[batch_caption] 10/10 images done (5 captioned, 2 failed, 3 skipped), 5.0 img/s, ETA 0 s"


@pytest.mark.slow
def test_share_model_on_the_in_memory_runner(tiny_bundle, tmp_path):
    Image.fromarray(varied_images(1, 64)[0]).save(tmp_path / "a.png")
    manifest = run.run(["--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "o"), "--model", tiny_bundle,
                        "--run_id", "s", "--share_model"])
    captions, errors, _ = read_run(str(tmp_path / "o" / "run=s"))
    assert manifest["counts"]["captioned"] == 1 and not errors and captions[0]["model"] == manifest["model"]


@pytest.mark.slow
def test_share_model_across_worker_processes(tmp_path):
    """Two worker processes caption with one model, loaded once by the process that shares
    it: every image gets one caption, the caption of a run whose workers load their own."""
    _write_pngs(tmp_path / "in", [f"{i}.png" for i in range(4)], seed=7)
    base = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "scenes", "--batch_size", "2",
            "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    own = run.run(base + ["--run_id", "own"])
    shared = run.run(base + ["--run_id", "shared", "--share_model"])
    assert own["metrics"]["model_loads"] == 2  # both workers captioned, each with a model of its own
    assert shared["metrics"]["model_loads"] == 1
    by_run = {}
    for manifest in (own, shared):
        captions, errors, _ = read_run(str(tmp_path / "out" / f"run={manifest['run_id']}"))
        assert not errors and manifest["counts"]["captioned"] == len(captions)
        by_run[manifest["run_id"]] = {r["path"]: r for r in captions}
        assert sorted(r["path"] for r in captions) == sorted(str(p) for p in (tmp_path / "in").iterdir())
    for path, r in by_run["shared"].items():
        assert r["caption"] == by_run["own"][path]["caption"]
        assert r["score"] == pytest.approx(by_run["own"][path]["score"], abs=1e-4)


def test_a_corrupted_model_stops_the_run_before_any_work(tiny_bundle, tmp_path, capsys):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    weights = bundle / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    Image.fromarray(varied_images(1, 32)[0]).save(tmp_path / "a.png")
    assert run.main(["--model", str(bundle), "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.weights.h5 is corrupted" in err
    assert not (tmp_path / "o").exists()


# --- incremental runs and duplicate content ---------------------------------------------


def _write_pngs(folder, names, seed):
    folder.mkdir(parents=True, exist_ok=True)
    for name, px in zip(names, varied_images(len(names), 64, seed=seed)):
        Image.fromarray(px).save(folder / name)


def test_incremental_runs_caption_only_new_or_changed_files(tiny_model, tiny_vocab, tiny_bundle, tmp_path):
    from batch_caption.model.bundle import save_bundle
    from batch_caption.model.show_and_tell import ShowAndTell

    src, out = tmp_path / "archive", str(tmp_path / "out")
    _write_pngs(src, [f"{i}.png" for i in range(6)], seed=1)
    base = ["--input", str(src), "--output", out, "--incremental"]
    first = run.run(base + ["--model", tiny_bundle, "--run_id", "night1"])
    assert first["counts"]["captioned"] == 6 and first["counts"]["skipped"] == 0
    assert open(os.path.join(out, "LATEST")).read().strip() == "night1"

    _write_pngs(src, ["new1.png", "new2.png", "new3.png"], seed=2)  # 3 new
    Image.fromarray(varied_images(1, 64, seed=3)[0]).save(src / "0.png")  # 1 modified
    os.utime(src / "0.png", (os.stat(src / "0.png").st_atime, os.stat(src / "0.png").st_mtime + 10))
    (src / "5.png").unlink()  # 1 deleted
    second = run.run(base + ["--model", tiny_bundle, "--run_id", "night2"])
    captions, errors, _ = read_run(os.path.join(out, "run=night2"))
    assert sorted(os.path.basename(r["path"]) for r in captions) == ["0.png", "new1.png", "new2.png", "new3.png"]
    assert not errors
    assert second["counts"]["skipped"] == 4 and second["counts"]["matched"] == 8
    assert second["previous_runs"] == ["night1"]
    assert open(os.path.join(out, "LATEST")).read().strip() == "night2"

    # A file touched but unchanged is read, found identical, and skipped.
    os.utime(src / "1.png", (0, os.stat(src / "1.png").st_mtime + 20))
    third = run.run(base + ["--model", tiny_bundle, "--run_id", "night3"])
    assert third["counts"]["captioned"] == 0 and third["counts"]["skipped"] == 8

    # Another model: everything is captioned again.
    other = ShowAndTell(tiny_model.config)
    other.build_all()
    other_bundle = str(tmp_path / "other_model")
    save_bundle(other, tiny_vocab, other_bundle)
    fourth = run.run(base + ["--model", other_bundle, "--run_id", "night4"])
    assert fourth["counts"]["captioned"] == 8 and fourth["counts"]["skipped"] == 0


def test_identical_bytes_are_decoded_and_captioned_once(tiny_bundle, tmp_path):
    src = tmp_path / "copies"
    src.mkdir()
    data = _encode(Image.fromarray(varied_images(1, 64, seed=4)[0]), "PNG")
    for i in range(10):
        (src / f"copy {i}.png").write_bytes(data)
    manifest = run.run(["--input", str(src), "--output", str(tmp_path / "out"), "--model", tiny_bundle, "--run_id", "d"])
    captions, errors, _ = read_run(str(tmp_path / "out" / "run=d"))
    assert sorted(r["path"] for r in captions) == sorted(str(p) for p in src.iterdir()) and not errors
    assert len({r["caption"] for r in captions}) == 1
    m = manifest["metrics"]
    assert m["decoded"] == 1 and m["num_inferences"] == 1 and m["captioned"] == 10
    assert m["duplicate_content"] == 9


def test_dedupe_hashes_only_files_whose_size_another_file_shares(tiny_bundle, tmp_path):
    # BMPs of one shape have one size whatever their pixels: a size shared by different
    # contents, by identical ones, and a size of its own.
    src = tmp_path / "in"
    src.mkdir()
    a, b, c = (Image.fromarray(px) for px in varied_images(3, 48, seed=6))
    data = _encode(a, "BMP")
    (src / "copy1.bmp").write_bytes(data)
    (src / "copy2.bmp").write_bytes(data)
    (src / "same size.bmp").write_bytes(_encode(b, "BMP"))
    (src / "own size.bmp").write_bytes(_encode(c.resize((40, 40)), "BMP"))
    listed = tmp_path / "listed.bmp"  # a list file gives no size: hashed
    listed.write_bytes(_encode(c, "BMP"))
    (tmp_path / "list.txt").write_text(f"{listed}\n")
    sizes = {p.name: p.stat().st_size for p in src.iterdir()}
    assert sizes["copy1.bmp"] == sizes["same size.bmp"] != sizes["own size.bmp"]

    manifest = run.run(["--input", str(src), "--input_list", str(tmp_path / "list.txt"), "--output", str(tmp_path / "out"),
                        "--model", tiny_bundle, "--run_id", "d"])
    captions, errors, _ = read_run(str(tmp_path / "out" / "run=d"))
    assert sorted(r["path"] for r in captions) == sorted([str(p) for p in src.iterdir()] + [str(listed)]) and not errors
    m = manifest["metrics"]
    assert m["hashed_for_dedupe"] == 4  # the three of one size and the listed one, not "own size"
    assert m["decoded"] == 4 and m["duplicate_content"] == 1 and m["captioned"] == 5
    # Every file's bytes are counted once, whether it was hashed first or not.
    assert m["bytes_read"] == sum(sizes.values()) + listed.stat().st_size


def test_no_flags_captions_the_default_models_samples_with_it(tmp_path, monkeypatch):
    default = bundled.default()
    samples = default.sample_files()
    assert samples and default.installed()
    monkeypatch.chdir(tmp_path)
    manifest = run.run(["--run_id", "samples"])
    captions, errors, _ = read_run(str(tmp_path / "captions" / "run=samples"))
    assert sorted(r["path"] for r in captions) == samples and not errors
    assert all(r["caption"] for r in captions) and manifest["model_path"] == default.path
    assert manifest["model"] == default.bundle_id() and manifest["options"]["low_score_threshold"] == default.low_score


@pytest.mark.parametrize("flags, named", [
    (["--input", "gs://b/photos/", "--output", "out"], "--output out"),
    (["--input", "photos/", "--output", "gs://b/out"], "--input photos/"),
    (["--input", "gs://b/p/", "--input_list", "list.txt", "--output", "gs://b/out"], "--input_list list.txt"),
    (["--input", "gs://b/p/", "--output", "gs://b/out", "--model", "/models/m"], "--model /models/m"),
])
def test_dataflow_with_a_local_path_fails_fast_in_one_line(flags, named, capsys):
    assert run.main(["--runner=DataflowRunner", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "gs://" in err


@pytest.mark.parametrize("model", [[], ["--model", "scenes"]])
def test_dataflow_with_remote_paths_and_a_bundled_model_passes_the_check(model):
    config, options = run.parse(["--runner=DataflowRunner", "--input", "gs://b/p/", "--output", "gs://b/out", *model])
    run.check_remote_paths(config, options)  # a bundled model travels with the package


def test_attention_maps_reach_the_records(attention_model, tiny_vocab, tiny_bundle, tmp_path, capsys):
    from batch_caption.model.bundle import save_bundle

    bundle = str(tmp_path / "attention")
    save_bundle(attention_model, tiny_vocab, bundle)
    src = tmp_path / "in"
    src.mkdir()
    for i, px in enumerate(varied_images(3, 64, seed=11)):
        Image.fromarray(px).save(src / f"{i}.png")
    run.run(["--input", str(src), "--output", str(tmp_path / "out"), "--model", bundle, "--run_id", "maps",
             "--attention_maps"])
    captions, errors, _ = read_run(str(tmp_path / "out" / "run=maps"))
    assert len(captions) == 3 and not errors
    for record in captions:
        attention = record["attention"]
        assert attention["grid"] == [2, 2]
        assert len(attention["words"]) == len(attention["percent"]) >= 1
        assert " ".join(attention["words"]).replace(" ,", ",") == record["caption"]
        assert all(len(row) == 4 and 97 <= sum(row) <= 103 for row in attention["percent"])
    # A Show-and-Tell model has no attention to show: refused before any work.
    capsys.readouterr()
    assert run.main(["--input", str(src), "--output", str(tmp_path / "o2"), "--model", tiny_bundle,
                     "--attention_maps"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--attention_maps needs a model with the attention decoder" in err
    assert not (tmp_path / "o2").exists()
