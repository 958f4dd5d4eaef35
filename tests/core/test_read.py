"""ReadImages and its DoFns: read-ahead order and windows, dedupe, every path accounted for."""

from __future__ import annotations

import gc
import hashlib
import io
import weakref

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import IntervalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from helpers import special_files, varied_images, within
from PIL import Image

from batch_caption.core.elements import FileData, SourceFile, as_source
from batch_caption.core.read import HashFileFn, ReadDecodeFn, split_by_size
from batch_caption.core.readahead import ReadAheadFn
from batch_caption.images import decoding
from batch_caption.pipeline import ERRORS, ReadImages


def test_a_decode_error_is_kept_without_a_reference_cycle(tmp_path):
    # The error waits in the read-ahead queue as a value; with its traceback it would
    # reference the frame that holds it (and the file's bytes), which only the cyclic
    # GC frees, and not at all if a first model load has the GC off and freezes.
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 200)
    fn = ReadDecodeFn(decoding.ImageConfig(image_size=8), 1 << 20, "r", threads=0)
    fn.setup()
    enabled = gc.isenabled()
    gc.disable()
    try:
        read = fn._work(str(path))
        assert isinstance(read.error, decoding.ImageDecodeError)
        alive = weakref.ref(read.error)
        del read
        assert alive() is None  # freed by reference counting alone
    finally:
        if enabled:
            gc.enable()


def _file_data(name: str, data: bytes) -> FileData:
    return FileData((SourceFile(name),), data, hashlib.sha256(data).hexdigest())


def _run_bundle(fn: ReadAheadFn, files) -> list:
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
    config = decoding.ImageConfig(image_size=16)
    inline = [_summary(o) for o in _run_bundle(ReadDecodeFn(config, 1 << 20, "r", threads=0), files)]
    # lookahead 3 < 8 files: outputs leave both from process and from finish_bundle.
    ahead = [_summary(o) for o in _run_bundle(ReadDecodeFn(config, 1 << 20, "r", threads=2, lookahead=3), files)]
    assert ahead == inline
    assert [s[1][0] for s in ahead] == [f.sources[0].path for f in files]  # input order
    for i, (tag, what, timestamp, windows) in enumerate(ahead):
        assert timestamp == Timestamp(i) and windows == (IntervalWindow(i, i + 1),)
        assert (tag == ERRORS) == (what[0] in ("broken", "empty"))
    assert dict(s[1] for s in ahead if s[0]) == {"broken": "UnsupportedImageError", "empty": "EmptyImageError"}


def test_a_bug_while_decoding_ahead_fails_the_bundle():
    fn = ReadDecodeFn(decoding.ImageConfig(image_size=16), 1 << 20, "r", threads=1, lookahead=4)
    bad = FileData((SourceFile("x"),), "text, not bytes", "0" * 64)  # TypeError: a bug, not data
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
            | beam.ParDo(ReadDecodeFn(decoding.ImageConfig(image_size=8), 1 << 20, "r", threads=2, lookahead=2))
            | beam.ParDo(Where())
        )
        assert_that(decoded, equal_to([(f"img{i}", float(start)) for i in range(4) for start in (i - 1, i)]))



def test_split_by_size_streams_groups_and_keeps_every_file():
    a, b, c = (SourceFile(f"/x/{n}", 10) for n in "abc")
    assert list(split_by_size((10, iter([a])))) == [a]  # any iterable, no len() needed
    out = list(split_by_size((10, iter([a, b, c]))))
    assert [(o.tag, o.value) for o in out] == [("same_size", f) for f in (a, b, c)]


def test_dedupe_shuffles_hashes_not_bytes_and_reads_each_content_once(tmp_path):
    data = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(data, format="PNG")
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(data.getvalue())
    (tmp_path / "c.png").write_bytes(b"not an image")
    paths = sorted(str(p) for p in tmp_path.iterdir())

    # The hashing read keeps no bytes: only paths and hashes go through the GroupByKey.
    hashed = [o.value for o in _run_bundle(HashFileFn(1 << 20, "r"), [SourceFile(paths[0])])]
    assert hashed[0].data is None and hashed[0].sha256 == hashlib.sha256(data.getvalue()).hexdigest()

    config = decoding.ImageConfig(image_size=32)
    with BeamTestPipeline() as p:
        out = p | beam.Create([SourceFile(x) for x in paths]) | ReadImages(config, 1 << 20, "r", dedupe=True)
        examples = out["images"] | beam.Map(lambda e: (sorted(s.path for s in e.sources), e.size_bytes, e.pixels.shape))
        assert_that(examples, equal_to([(paths[:2], len(data.getvalue()), (32, 32, 3))]), label="images")
        assert_that(out[ERRORS] | beam.Map(lambda r: (r["path"], r["stage"])),
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
    sizes = [len(small), len(unchanged) + 7, 5000, 12] if sized else [None] * 4
    files = [
        SourceFile(str(tmp_path / "small.png"), sizes[0], previous_sha256="0" * 64),  # changed since: read
        SourceFile(str(tmp_path / "unchanged.png"), sizes[1], previous_sha256=hashlib.sha256(unchanged).hexdigest()),
        SourceFile(str(tmp_path / "big.bin"), sizes[2]) if sized else str(tmp_path / "big.bin"),
        SourceFile(str(tmp_path / "missing.png"), sizes[3]) if sized else str(tmp_path / "missing.png"),
    ]
    with BeamTestPipeline() as p:
        out = p | beam.Create(files) | ReadImages(decoding.ImageConfig(image_size=8), limit, "r", dedupe=dedupe)
        assert_that(out["images"] | beam.Map(lambda e: (e.path, e.size_bytes, e.sha256, e.pixels.shape)),
                    equal_to([(files[0].path, len(small), hashlib.sha256(small).hexdigest(), (8, 8, 3))]),
                    label="images")
        assert_that(out["skipped"] | "SkippedPaths" >> beam.Map(lambda f: f.path), equal_to([files[1].path]), label="skipped")
        too_large = f"file is larger than the limit of {limit:,} bytes"
        assert_that(out[ERRORS] | beam.Map(lambda r: (r["path"], r["stage"], r["error"], r["message"] == too_large)),
                    equal_to([(as_source(files[2]).path, "read", "FileTooLargeError", True),
                              (as_source(files[3]).path, "read", "FileNotFoundError", False)]),
                    label="errors")


def test_many_read_threads_decode_at_most_max_decodes_at_once(monkeypatch):
    import threading
    import time

    lock, now, peak = threading.Lock(), [0], [0]
    decode = decoding.decode_image

    def slow_decode(data, config):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.02)
        with lock:
            now[0] -= 1
        return decode(data, config)

    monkeypatch.setattr(decoding, "decode_image", slow_decode)
    b = io.BytesIO()
    Image.fromarray(varied_images(1, 20, seed=3)[0]).save(b, format="PNG")
    files = [_file_data(f"img{i}", b.getvalue()) for i in range(12)]
    fn = ReadDecodeFn(decoding.ImageConfig(image_size=8), 1 << 20, "r", threads=6, lookahead=12, max_decodes=2)
    out = _run_bundle(fn, files)
    assert [o.value.path for o in out] == [f.sources[0].path for f in files]
    assert peak[0] == 2


@pytest.mark.parametrize("dedupe", [False, True])
def test_fifos_devices_and_sockets_from_a_list_are_read_errors_not_hangs(tmp_path, dedupe):
    special = special_files(tmp_path)
    paths = [special[n] for n in ("fifo.png", "fifo_link.png", "zero_link.png", "socket.png", "dir.png")]

    def read():
        with BeamTestPipeline() as p:
            out = p | beam.Create(paths) | ReadImages(decoding.ImageConfig(image_size=8), 1 << 20, "r", dedupe=dedupe)
            assert_that(out["images"], equal_to([]), label="images")
            assert_that(out[ERRORS] | beam.Map(lambda r: (r["path"], r["stage"], r["error"], r["message"].split(" is ")[-1])),
                        equal_to([(paths[0], "read", "NotARegularFile", "a FIFO (named pipe); not read"),
                                  (paths[1], "read", "NotARegularFile", "a FIFO (named pipe); not read"),
                                  (paths[2], "read", "NotARegularFile", "a character device; not read"),
                                  (paths[3], "read", "NotARegularFile", "a socket; not read"),
                                  (paths[4], "read", "NotARegularFile", "a directory; not read")]), label="errors")

    within(120, read)
