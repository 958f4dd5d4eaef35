"""Transform-level tests of the job's composite transforms, with fake model handlers."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import traceback
import weakref

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import IntervalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from helpers import varied_images
from PIL import Image

from batch_caption import images
from batch_caption import pipeline as P
from batch_caption.inference import CaptionModelHandler, ImageExample, ModelLoadError
from batch_caption.model.captioner import Caption
from batch_caption.model.config import DecodeConfig


def _example(path):
    return ImageExample(path=path, pixels=np.zeros((8, 8, 3), np.uint8), width=8, height=8, format="PNG",
                        sha256="0" * 64, size_bytes=10)


class _FakeModel:
    def caption(self, pixels):
        return [[Caption("a thing", (4,), -1.0, -0.5)] for _ in range(len(pixels))]

    def get_model_id(self):
        return "fake"


class FlakyHandler(CaptionModelHandler):
    """Captions everything, except that a batch holding a path with 'bad' raises."""

    def load_model(self):
        return _FakeModel()

    def run_inference(self, batch, model, inference_args=None):
        if any("bad" in e.path for e in batch):
            raise RuntimeError("device fell over")
        return super().run_inference(batch, model, inference_args)


def test_a_failed_inference_batch_becomes_one_error_record_per_image():
    handler = FlakyHandler("unused", DecodeConfig(), batch_size=2)
    paths = ["ok1", "ok2", "bad1", "ok3"]
    with BeamTestPipeline() as p:
        out = (
            p
            | beam.Create([_example(x) for x in paths])
            | P.CaptionImages(handler, DecodeConfig(), run_id="r", low_score_threshold=-1.5)
        )
        done = (
            (out["captions"] | "C" >> beam.Map(lambda r: (r["path"], "captioned", r["caption"])),
             out[P.ERRORS] | "E" >> beam.Map(lambda r: (r["path"], r["stage"], r["error"], r["message"])))
            | beam.Flatten()
            | beam.Map(lambda t: (t[0], t[1:]))
        )
        # Batches may pair any two elements: check each path lands once, correctly.

        def check(items):
            by_path = dict(items)
            assert sorted(by_path) == sorted(paths) and len(items) == len(paths)
            assert by_path["bad1"] == ("infer", "RuntimeError", "device fell over")
            for path, outcome in by_path.items():
                assert outcome[0] in ("captioned", "infer")
                if outcome[0] == "captioned":
                    assert outcome[1] == "a thing"

        assert_that(done, check)


def test_a_decode_error_is_kept_without_a_reference_cycle(tmp_path):
    # The error waits in the read-ahead queue as a value; with its traceback it would
    # reference the frame that holds it (and the file's bytes), which only the cyclic
    # GC frees, and not at all if a first model load has the GC off and freezes.
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 200)
    fn = P._ReadDecodeFn(images.ImageConfig(image_size=8), 1 << 20, "r", threads=0)
    fn.setup()
    enabled = gc.isenabled()
    gc.disable()
    try:
        read = fn._work(str(path))
        assert isinstance(read.decoded, images.ImageDecodeError)
        alive = weakref.ref(read.decoded)
        del read
        assert alive() is None  # freed by reference counting alone
    finally:
        if enabled:
            gc.enable()


class BrokenModelHandler(CaptionModelHandler):
    """Its model fails to load, in the background as the real handler's does."""

    def load_now(self):
        raise OSError("weights unreadable")


def test_a_model_that_fails_to_load_fails_the_run_not_the_images():
    handler = BrokenModelHandler("unused", DecodeConfig(), batch_size=2)
    # Without the check, each image would become an 'infer' error record and the run
    # would succeed.
    with pytest.raises(Exception, match="ModelLoadError.*the model failed to load: OSError: weights unreadable"):
        with BeamTestPipeline() as p:
            _ = (
                p
                | beam.Create([_example(x) for x in ["a", "b", "c"]])
                | P.CaptionImages(handler, DecodeConfig(), run_id="r")
            )


def test_describe_failure_handles_beam_dead_letter_tuples():
    exc = (ValueError, "ValueError('x: y')", ["Traceback...\n", "ValueError: x: y\n"])
    assert P._describe_failure(exc) == ("ValueError", "x: y")
    assert P._describe_failure(KeyError("k")) == ("KeyError", "'k'")
    # A class outside builtins: traceback writes "module.Name: message".
    try:
        raise ModelLoadError("the model failed to load: OSError: gone")
    except ModelLoadError as e:
        dead = (type(e), repr(e), traceback.format_exception(e))
    assert P._describe_failure(dead) == ("ModelLoadError", "the model failed to load: OSError: gone")
    assert P._is_model_load_failure((ModelLoadError, "ModelLoadError('x')", []))
    assert not P._is_model_load_failure(exc) and not P._is_model_load_failure(KeyError("k"))


def test_match_images_dedupes_and_reports_empty_patterns(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.png'}\n")
    with BeamTestPipeline() as p:
        out = p | P.MatchImages([str(tmp_path / "*.png"), str(tmp_path / "none-*.jpg")], [str(listing)], "r")
        paths = out["files"] | beam.Map(lambda f: (f.path, f.size))
        # a.png came from the glob and the list: one file, with the glob's metadata.
        assert_that(paths, equal_to([(str(tmp_path / "a.png"), 1), (str(tmp_path / "b.png"), 1)]), label="Paths")
        assert_that(out[P.ERRORS] | beam.Map(lambda r: (r["path"], r["stage"], r["error"])),
                    equal_to([(str(tmp_path / "none-*.jpg"), "match", "NoMatch")]), label="Errors")


def test_the_bundled_model_is_resolved_on_the_worker_not_the_driver():
    import os

    import batch_caption
    from batch_caption.inference import BUNDLED_MODEL, resolve_model_path

    here = os.path.join(os.path.dirname(batch_caption.__file__), "default_model")
    assert resolve_model_path(BUNDLED_MODEL) == os.path.abspath(here)
    assert resolve_model_path("gs://b/m") == "gs://b/m"


def _file_data(name: str, data: bytes) -> P.FileData:
    return P.FileData((P.SourceFile(name),), data, hashlib.sha256(data).hexdigest())


def _run_bundle(fn: P._AheadFn, files) -> list:
    """Runs one bundle through the DoFn by hand; input i gets timestamp i, window [i, i+1)."""
    fn.setup()
    fn.start_bundle()
    out = []
    for i, f in enumerate(files):
        out.extend(fn.process(f, WindowedValue(f, Timestamp(i), [IntervalWindow(i, i + 1)])))
    out.extend(fn.finish_bundle())
    fn.teardown()
    return out


def _summary(output):
    tag = output.tag if isinstance(output, beam.pvalue.TaggedOutput) else None
    wv = output.value if tag else output
    value = wv.value
    what = (value["path"], value["error"]) if tag else (value.path, value.pixels.tobytes(), value.width, value.format)
    return tag, what, wv.timestamp, tuple(wv.windows)


def test_decoding_ahead_in_threads_keeps_order_windows_and_errors():
    buf = []
    for i, pixels in enumerate(varied_images(6, 40, seed=5)):
        b = io.BytesIO()
        Image.fromarray(pixels).save(b, format="JPEG" if i % 2 else "PNG")
        buf.append(b.getvalue())
    files = [_file_data(f"img{i}", data) for i, data in enumerate(buf)]
    files.insert(2, _file_data("broken", b"not an image at all"))
    files.insert(5, _file_data("empty", b""))
    config = images.ImageConfig(image_size=16)
    inline = [_summary(o) for o in _run_bundle(P._ReadDecodeFn(config, 1 << 20, "r", threads=0), files)]
    # lookahead 3 < 8 files: outputs leave both from process and from finish_bundle.
    ahead = [_summary(o) for o in _run_bundle(P._ReadDecodeFn(config, 1 << 20, "r", threads=2, lookahead=3), files)]
    assert ahead == inline
    assert [s[1][0] for s in ahead] == [f.sources[0].path for f in files]  # input order
    for i, (tag, what, timestamp, windows) in enumerate(ahead):
        assert timestamp == Timestamp(i) and windows == (IntervalWindow(i, i + 1),)
        assert (tag == P.ERRORS) == (what[0] in ("broken", "empty"))
    assert dict(s[1] for s in ahead if s[0]) == {"broken": "UnsupportedImageError", "empty": "EmptyImageError"}


def test_a_bug_while_decoding_ahead_fails_the_bundle():
    fn = P._ReadDecodeFn(images.ImageConfig(image_size=16), 1 << 20, "r", threads=1, lookahead=4)
    bad = P.FileData((P.SourceFile("x"),), "text, not bytes", "0" * 64)  # TypeError: a bug, not data
    with pytest.raises(TypeError):
        _run_bundle(fn, [bad])


def test_decoding_ahead_gives_each_window_its_own_output():
    buf = io.BytesIO()
    Image.fromarray(varied_images(1, 40, seed=2)[0]).save(buf, format="PNG")
    files = [_file_data(f"img{i}", buf.getvalue()) for i in range(4)]

    class Where(beam.DoFn):
        def process(self, example, window=beam.DoFn.WindowParam):
            yield example.path, float(window.start)

    with BeamTestPipeline() as p:
        decoded = (
            p
            | beam.Create([(i, f) for i, f in enumerate(files)])
            | beam.Map(lambda kv: beam.window.TimestampedValue(kv[1], kv[0]))
            | beam.WindowInto(beam.window.SlidingWindows(size=2, period=1))  # 2 windows each
            | beam.ParDo(P._ReadDecodeFn(images.ImageConfig(image_size=8), 1 << 20, "r", threads=2, lookahead=2))
            | beam.ParDo(Where())
        )
        assert_that(decoded, equal_to([(f"img{i}", float(start)) for i in range(4) for start in (i - 1, i)]))


_FILE = (bytes(range(256)) * 12)[:3000]


def _open_recording_reads(monkeypatch) -> list[int]:
    """Every FileSystems.open gives a buffered stream of _FILE; -> the sizes its reads ask for."""
    asked = []

    class Recording(io.BytesIO):
        def read(self, n=-1):
            asked.append(n)
            return super().read(n)

    monkeypatch.setattr(P.FileSystems, "open", lambda path, compression_type: Recording(_FILE))
    return asked


@pytest.mark.parametrize("size_hint, limit, expected, reads", [
    (3000, 8 << 20, 3000, 1),  # the matched size
    (1000, 8 << 20, 3000, 2),  # the file grew since it was matched
    (0, 8 << 20, 3000, 2),
    (5000, 8 << 20, 3000, 1),  # it shrank
    (None, 8 << 20, 3000, 1),  # a path from a list file: no size
    (3000, 2001, 2001, 1),  # larger than the limit: limit bytes, no more
    (3000, 3000, 3000, 1),  # one byte over max_bytes (limit - 1): too large, as it should
    (3000, 3001, 3000, 1),  # exactly max_bytes
])
def test_reads_ask_for_what_the_file_holds_not_the_limit(monkeypatch, size_hint, limit, expected, reads):
    asked = _open_recording_reads(monkeypatch)
    got, size, sha = P._read("any", limit - 1, keep=True, size_hint=size_hint)
    assert got == _FILE[:expected] and size == expected and sha == hashlib.sha256(_FILE[:expected]).hexdigest()
    # A buffered read(n) allocates n bytes first: never ask for the whole limit (256 MiB
    # by default) when the file is a few MB.
    assert max(asked) <= max(P.READ_CHUNK_BYTES, (size_hint or 0) + 1)
    # A short read of a buffered stream is its end: no read past it (on GCS each is a request).
    assert len(asked) == reads


@pytest.mark.parametrize("max_bytes, size", [(8 << 20, 3000), (2000, 2001)])
def test_hashing_streams_the_file_and_stops_at_its_end_or_the_limit(monkeypatch, max_bytes, size):
    asked = _open_recording_reads(monkeypatch)
    assert P._read("any", max_bytes, keep=False) == (None, size, hashlib.sha256(_FILE[:size]).hexdigest())
    assert len(asked) == 1  # the short (or limit-filling) read ends it: no request past the end


def test_a_stream_with_short_reads_is_read_to_its_end():
    data = bytes(range(256)) * 40

    class Trickle(io.RawIOBase):  # not buffered: a short read says nothing about the end
        def __init__(self):
            self.pos = 0

        def readable(self):
            return True

        def readinto(self, b):
            n = min(7, len(b), len(data) - self.pos)
            b[:n] = data[self.pos:self.pos + n]
            self.pos += n
            return n

    assert P._read_at_most(Trickle(), 1 << 20, len(data)) == data
    assert P._read_at_most(Trickle(), 100, None) == data[:100]


def test_split_by_size_streams_groups_and_keeps_every_file():
    a, b, c = (P.SourceFile(f"/x/{n}", 10) for n in "abc")
    assert list(P._split_by_size((10, iter([a])))) == [a]  # any iterable, no len() needed
    out = list(P._split_by_size((10, iter([a, b, c]))))
    assert [(o.tag, o.value) for o in out] == [("same_size", f) for f in (a, b, c)]


def test_dedupe_shuffles_hashes_not_bytes_and_reads_each_content_once(tmp_path):
    data = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(data, format="PNG")
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(data.getvalue())
    (tmp_path / "c.png").write_bytes(b"not an image")
    paths = sorted(str(p) for p in tmp_path.iterdir())

    # The hashing read keeps no bytes: only paths and hashes go through the GroupByKey.
    hashed = [o.value for o in _run_bundle(P._HashFileFn(1 << 20, "r"), [P.SourceFile(paths[0])])]
    assert hashed[0].data is None and hashed[0].sha256 == hashlib.sha256(data.getvalue()).hexdigest()

    config = images.ImageConfig(image_size=32)
    with BeamTestPipeline() as p:
        out = p | beam.Create([P.SourceFile(x) for x in paths]) | P.ReadImages(config, 1 << 20, "r", dedupe=True)
        examples = out["images"] | beam.Map(lambda e: (sorted(s.path for s in e.sources), e.size_bytes, e.pixels.shape))
        assert_that(examples, equal_to([(paths[:2], len(data.getvalue()), (32, 32, 3))]), label="images")
        assert_that(out[P.ERRORS] | beam.Map(lambda r: (r["path"], r["stage"])),
                    equal_to([(paths[2], "decode")]), label="errors")


@pytest.mark.parametrize("sized", [False, True])
@pytest.mark.parametrize("dedupe", [False, True])
def test_reading_gives_every_path_an_image_an_error_or_a_skip(tmp_path, dedupe, sized):
    def png(colour) -> bytes:
        b = io.BytesIO()
        Image.new("RGB", (20, 10), colour).save(b, format="PNG")
        return b.getvalue()

    small, unchanged = png((200, 10, 10)), png((10, 200, 10))
    (tmp_path / "small.png").write_bytes(small)
    (tmp_path / "unchanged.png").write_bytes(unchanged)
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    limit = max(len(small), len(unchanged)) + 10
    # Sizes as matching gives them (each its own, so dedupe hashes none of them; one stale)
    # or none, as for paths from list files (dedupe hashes them all).
    sizes = [len(small), len(unchanged) + 7, 5000, 123] if sized else [None] * 4
    files = [
        P.SourceFile(str(tmp_path / "small.png"), sizes[0], previous_sha256="0" * 64),  # changed since: read
        P.SourceFile(str(tmp_path / "unchanged.png"), sizes[1], previous_sha256=hashlib.sha256(unchanged).hexdigest()),
        P.SourceFile(str(tmp_path / "big.bin"), sizes[2]) if sized else str(tmp_path / "big.bin"),
        P.SourceFile(str(tmp_path / "missing.png"), sizes[3]) if sized else str(tmp_path / "missing.png"),
    ]
    with BeamTestPipeline() as p:
        out = p | beam.Create(files) | P.ReadImages(images.ImageConfig(image_size=8), limit, "r", dedupe=dedupe)
        assert_that(out["images"] | beam.Map(lambda e: (e.path, e.size_bytes, e.sha256, e.pixels.shape)),
                    equal_to([(files[0].path, len(small), hashlib.sha256(small).hexdigest(), (8, 8, 3))]),
                    label="images")
        assert_that(out["skipped"], equal_to([files[1].path]), label="skipped")
        too_large = f"file is larger than the limit of {limit:,} bytes"
        assert_that(out[P.ERRORS] | beam.Map(lambda r: (r["path"], r["stage"], r["error"], r["message"] == too_large)),
                    equal_to([(P._source(files[2]).path, "read", "FileTooLargeError", True),
                              (P._source(files[3]).path, "read", "FileNotFoundError", False)]),
                    label="errors")


def test_many_read_threads_decode_at_most_max_decodes_at_once(monkeypatch):
    import threading
    import time

    lock, now, peak = threading.Lock(), [0], [0]
    decode = images.decode_image

    def slow_decode(data, config):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.02)
        with lock:
            now[0] -= 1
        return decode(data, config)

    monkeypatch.setattr(images, "decode_image", slow_decode)
    b = io.BytesIO()
    Image.fromarray(varied_images(1, 20, seed=3)[0]).save(b, format="PNG")
    files = [_file_data(f"img{i}", b.getvalue()) for i in range(12)]
    fn = P._ReadDecodeFn(images.ImageConfig(image_size=8), 1 << 20, "r", threads=6, lookahead=12, max_decodes=2)
    out = _run_bundle(fn, files)
    assert [o.value.path for o in out] == [f.sources[0].path for f in files]
    assert peak[0] == 2


@pytest.fixture(params=["local", "gcs"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run=w")
    bucket = request.getfixturevalue("gcs_emulator")
    return f"gs://{bucket}/shards/{request.node.originalname}/run=w"


def _write_bundle(fn, rows):
    fn.start_bundle()
    for r in rows:
        assert not list(fn.process(r) or [])  # records go to the file, nothing downstream
    return [wv.value for wv in fn.finish_bundle() or []]


def _lines(path):
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return [json.loads(x) for x in f.read().decode().splitlines()]


def test_bundles_write_temp_shards_that_the_manifest_step_names_once(run_dir):
    """Each bundle writes its own temp file; publishing names them kind-SSSSS-of-NNNNN in
    the run dir, gives a kind without records an empty shard, is safe to repeat (a retried
    step), and the temp dir goes, with what a failed attempt left there."""
    from apache_beam.io.filesystems import FileSystems

    temp = P.temp_dir_of(run_dir)
    fn = P._WriteShardFn(temp, "captions")
    fn.setup()
    rows = [{"path": f"p{i}", "caption": "a thing"} for i in range(5)]
    written = _write_bundle(fn, rows[:3]) + _write_bundle(fn, []) + _write_bundle(fn, rows[3:])
    assert len(written) == 2 and all(w.startswith(temp) for w in written)
    _write_bundle(fn, rows[:1])  # an attempt whose output never reached the manifest step: an orphan
    fn.start_bundle()
    list(fn.process(rows[0]) or [])
    failed = fn._path
    fn.teardown()  # a bundle that failed midway: its file is deleted at once
    assert not FileSystems.exists(failed)

    final = [FileSystems.join(run_dir, f"captions-0000{i}-of-00002.jsonl") for i in range(2)]
    written.sort()
    FileSystems.rename([written[0]], [final[0]])  # an earlier attempt of the step renamed one, then failed
    first = P._publish_shards(run_dir, "captions", written)
    again = P._publish_shards(run_dir, "captions", written)
    assert first == again == final
    assert sorted((r for f in first for r in _lines(f)), key=lambda r: r["path"]) == rows
    [empty] = P._publish_shards(run_dir, "errors", [])
    assert empty.endswith("errors-00000-of-00001.jsonl") and _lines(empty) == []

    P._remove_temp_dir(run_dir)
    left = sorted(m.path for m in FileSystems.match([FileSystems.join(run_dir, "**")])[0].metadata_list)
    assert left == sorted(first + [empty])


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs -> 2
    ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
    ({}, None),  # no cgroup files (not Linux, or not mounted)
])
def test_a_containers_cpu_quota_caps_the_cpus_counted(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert P.cgroup_cpu_quota(str(tmp_path)) == quota
    cpus = len(os.sched_getaffinity(0))
    assert P.available_cpus(str(tmp_path)) == (min(cpus, quota) if quota else cpus)
