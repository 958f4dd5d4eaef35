"""batch_caption.report: the HTML page's content, escaping, CLI, and a real headless browser.

The browser tests need Debian's chromium (/usr/bin/chromium); the `chromium` fixture
installs it with apt-get when it is missing (CI runs as root on Debian; see
.ci/install_chromium.sh), and fails loudly where it cannot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from helpers import within
from PIL import Image

from batch_caption.images import decoding as image_decoding
from batch_caption.report import overlay
from batch_caption.report import page as report_page

EVIL = '<script>alert("x")</script>'
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


# --- a run directory, by hand ----------------------------------------------------------


def _png(path, colour, size=(120, 90)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, "PNG")


def _caption(path, caption, score, alternatives=(), flags=None, size=(120, 90)):
    record = {
        "path": path, "caption": caption, "score": score, "logprob": score * 2,
        "alternatives": [{"caption": c, "score": s, "logprob": s * 2} for c, s in alternatives],
        "width": size[0], "height": size[1], "format": "PNG", "bytes": 1, "sha256": "0" * 64,
        "model": "m0d31", "run_id": "r1",
        "decode": {"beam_size": 3, "length_normalization": 0.7, "max_length": 20, "num_alternatives": 3},
    }
    if flags is not None:
        record["flags"] = flags
    return record


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def make_run(root, manifest=True):
    """root/images/* and root/out/run=r1/: 5 caption records (one image deleted, one path and
    caption full of markup and quotes), 3 error records; returns (run_dir, captions, errors)."""
    images = os.path.join(root, "images")
    paths = {name: os.path.join(images, f"{name}.png") for name in COLOURS}
    for name, colour in COLOURS.items():
        _png(paths[name], colour)
    # A real, readable image whose path holds markup: the "/" of "</script>" makes a folder.
    evil_path = os.path.join(images, f"a&b \"q\" 'x' {EVIL}.png")
    _png(evil_path, (255, 255, 0))
    gone = os.path.join(images, "gone.png")
    _png(gone, (255, 0, 255))
    os.remove(gone)
    captions = [
        _caption(paths["red"], "a red square", -1.25, [("a red box", -1.5), ("red", -2.0)], flags=[]),
        _caption(paths["green"], "a green square", -1.0, [("green green", -3.0)], flags=["repeated_ngram", "low_score"]),
        _caption(paths["blue"], "a blue square", -0.5),
        _caption(evil_path, f"{EVIL} & \"double\" 'single'", -2.0, [("<b>bold</b> & <i>it</i>", -2.5)],
                 flags=["unknown_word", "<img src=x onerror=alert(2)>"]),
        _caption(gone, "a magenta square", -3.0),
    ]
    errors = [
        {"path": os.path.join(images, "broken.jpg"), "stage": "decode", "error": "UnidentifiedImageError",
         "message": "cannot identify image file <img src=x onerror=alert(3)>", "run_id": "r1"},
        {"path": os.path.join(images, "huge.png"), "stage": "read", "error": "ValueError",
         "message": "file is 300 MB > --max_file_bytes", "run_id": "r1"},
        {"path": os.path.join(images, f"{EVIL}.gif"), "stage": "infer", "error": "RuntimeError",
         "message": f'"{EVIL}" & more', "run_id": "r1"},
    ]
    run_dir = os.path.join(root, "out", "run=r1")
    os.makedirs(run_dir)
    _write_jsonl(os.path.join(run_dir, "captions-00000-of-00001.jsonl"), captions)
    _write_jsonl(os.path.join(run_dir, "errors-00000-of-00001.jsonl"), errors)
    if manifest:
        with open(os.path.join(run_dir, "manifest.json"), "w") as f:
            json.dump({
                "format": "batch_caption.run/1", "run_id": "r1", "model": "m0d31", "model_path": "/models/m",
                "counts": {"captioned": 5, "failed": 3, "inputs": 8, "matched": 8, "skipped": 0,
                           "failed_by_stage": {"match": 0, "read": 1, "decode": 1, "infer": 1, "write": 0}},
                "options": {"beam_size": 3}, "files": {"captions": ["captions-00000-of-00001.jsonl"],
                                                        "errors": ["errors-00000-of-00001.jsonl"]},
                "start_time": "2026-01-02T03:04:05Z", "end_time": "2026-01-02T03:06:05Z",
            }, f)
    return run_dir, captions, errors


@pytest.fixture
def run_dir(tmp_path):
    return make_run(str(tmp_path))


# --- a tiny DOM: html.parser into a tree ------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag, attrs):
        self.tag, self.attrs, self.children = tag, dict(attrs), []

    @property
    def classes(self):
        return set((self.attrs.get("class") or "").split())

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag=None, cls=None):
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)]

    def find(self, tag=None, cls=None):
        found = self.find_all(tag, cls)
        return found[0] if found else None


class _TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs)
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, attrs))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):  # tolerate implied end tags
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(page)
    builder.close()
    return builder.root


def _cards(dom):
    return {c.attrs["data-path"]: c for c in dom.find_all("article", "card")}


def _decode_data_uri(uri):
    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):])))


# --- the page --------------------------------------------------------------------------


def test_default_output_counts_cards_and_errors(run_dir):
    run_dir, captions, errors = run_dir
    out = report_page.run([run_dir])
    assert out == os.path.join(run_dir, "report.html")
    page = open(out, encoding="utf-8").read()
    dom = parse(page)
    counts = {r.attrs["data-count"]: r.find("td").text() for r in dom.find_all("tr") if "data-count" in r.attrs}
    assert counts == {"matched": "8", "inputs": "8", "captioned": "5", "failed": "3", "failed:match": "0",
                      "failed:read": "1", "failed:decode": "1", "failed:infer": "1", "failed:write": "0",
                      "records:captions": "5", "records:errors": "3"}
    info = {r.attrs["data-info"]: r.find("td").text() for r in dom.find_all("tr") if "data-info" in r.attrs}
    assert info["run id"] == "r1" and info["model"] == "m0d31" and info["took"] == "120 s"
    assert info["started"] == "2026-01-02T03:04:05Z" and info["finished"] == "2026-01-02T03:06:05Z"
    assert "incomplete" not in page
    # One card per caption record, sorted by path; one row per error record.
    assert [c.attrs["data-path"] for c in dom.find_all("article", "card")] == sorted(r["path"] for r in captions)
    rows = dom.find_all("tr", "error-row")
    assert sorted((r.find("td", "path").text(), r.find("td", "stage").text(), r.find("td", "error").text(),
                   r.find("td", "message").text()) for r in rows) == sorted(
        (e["path"], e["stage"], e["error"], e["message"]) for e in errors)
    green = _cards(dom)[captions[1]["path"]]
    assert green.find(cls="caption").text() == "a green square"
    assert green.find(cls="score").find(cls="value").text() == "-1.000"
    assert [(a.find(cls="alt-caption").text(), a.find(cls="alt-score").text())
            for a in green.find_all("li", "alternative")] == [("green green", "-3.000")]
    assert [f.text() for f in green.find_all("li", "flag")] == ["repeated_ngram", "low_score"]
    assert green.find(cls="size").text() == "120 \u00d7 90"
    assert green.find("p", "path").text() == captions[1]["path"]
    assert _cards(dom)[captions[2]["path"]].find(cls="flags") is None  # no flags key, no flag list


def test_everything_is_escaped_and_nothing_is_loaded(run_dir):
    run_dir, captions, _ = run_dir
    page = open(report_page.run([run_dir, "--output", os.path.join(run_dir, "r.html")]), encoding="utf-8").read()
    low = page.lower()
    assert "<script" not in low and "<img src=x" not in low and "<b>" not in low and "<i>" not in low
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;double&quot; &#x27;single&#x27;" in page
    csp = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src &#x27;none&#x27;; img-src data:; "
           "style-src &#x27;unsafe-inline&#x27;")
    assert csp in page and page.index(csp) < page.index("<style>")
    assert "<link" not in low and "http://" not in low and "https://" not in low and "url(" not in low
    dom = parse(page)
    evil = _cards(dom)[captions[3]["path"]]  # data-path round-trips, quotes and all
    assert evil.find("p", "caption").text() == captions[3]["caption"]
    assert evil.find("p", "path").text() == captions[3]["path"]
    assert evil.find(cls="alt-caption").text() == "<b>bold</b> & <i>it</i>"
    assert [f.text() for f in evil.find_all("li", "flag")] == ["unknown_word", "<img src=x onerror=alert(2)>"]
    for node in dom.iter():  # the only elements are ours: no scripts, no handlers, only data: sources
        assert node.tag not in ("script", "iframe", "object", "embed", "link", "b", "i")
        assert not any(name.startswith("on") for name in node.attrs)
        assert all(node.attrs[a].startswith("data:image/jpeg;base64,") for a in ("src", "href") if a in node.attrs)


def test_thumbnails_and_an_image_that_is_gone(run_dir):
    run_dir, captions, _ = run_dir
    dom = parse(open(report_page.run([run_dir, "--thumbnail_size", "40"]), encoding="utf-8").read())
    cards = _cards(dom)
    for record, colour in zip(captions[:3], COLOURS.values()):
        img = cards[record["path"]].find("img", "thumb")
        thumb = _decode_data_uri(img.attrs["src"])
        assert thumb.format == "JPEG" and thumb.size == (40, 30) == (int(img.attrs["width"]), int(img.attrs["height"]))
        assert all(abs(a - b) < 16 for a, b in zip(thumb.convert("RGB").getpixel((20, 15)), colour))
    assert cards[captions[3]["path"]].find("img", "thumb") is not None
    gone = cards[captions[4]["path"]]
    assert gone.find("img") is None
    assert gone.find("p", "missing").text().startswith("image unavailable: ")
    assert gone.find("p", "caption").text() == "a magenta square" and gone.find(cls="size").text() == "120 \u00d7 90"


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
# Every way Python starts a program; a report that calls one fails the test.
_SPAWNERS = {subprocess: ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"),
             os: ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "execl",
                  "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                  "spawnl", "spawnle", "spawnlp", "spawnlpe")}


@pytest.fixture
def no_programs(monkeypatch):
    """Patches every way to start a program to record the call and raise; returns the calls."""
    from PIL import EpsImagePlugin

    calls = []

    def refuse(name):
        def spawn(*args, **kwargs):
            calls.append((name, args))
            raise AssertionError(f"the report started a program: {name}{args}")
        return spawn

    for module, names in _SPAWNERS.items():
        for name in names:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # unprobed: Pillow would look for Ghostscript
    return calls


def _one_image_run(root, options=None):
    """root/photo.jpg and root/out/run=r1/ holding its caption record and a manifest."""
    photo = os.path.join(root, "photo.jpg")
    Image.new("RGB", (120, 90), COLOURS["red"]).save(photo, "JPEG")
    run_dir = os.path.join(root, "out", "run=r1")
    os.makedirs(run_dir)
    _write_jsonl(os.path.join(run_dir, "captions-00000-of-00001.jsonl"), [_caption(photo, "a red square", -1.0)])
    with open(os.path.join(run_dir, "manifest.json"), "w") as f:
        json.dump({"run_id": "r1", "counts": {"captioned": 1, "failed": 0}, "options": options or {}}, f)
    return run_dir, photo


def _card(run_dir, photo):
    return _cards(parse(open(report_page.run([run_dir]), encoding="utf-8").read()))[photo]


def _card_note(run_dir, photo):
    missing = _card(run_dir, photo).find("p", "missing")
    return None if missing is None else missing.text()


def test_an_image_replaced_by_eps_shows_its_error_and_starts_no_program(tmp_path, no_programs):
    from batch_caption.pipeline.config import JobConfig

    defaults = {k: getattr(JobConfig, k) for k in ("max_image_pixels", "max_file_bytes", "draft")}
    run_dir, photo = _one_image_run(str(tmp_path), defaults)
    thumb = _card(run_dir, photo).find("img", "thumb")  # the run's image, never enlarged
    assert _decode_data_uri(thumb.attrs["src"]).size == (120, 90)
    assert (thumb.attrs["width"], thumb.attrs["height"]) == ("120", "90")
    with open(photo, "wb") as f:
        f.write(EPS)
    page = os.path.join(run_dir, "report.html")
    os.remove(page)
    note = _card_note(run_dir, photo)
    assert os.path.getsize(page) > 1000
    assert note.startswith("image unavailable: UnsupportedImageError: data is not a recognised image format"), note
    assert no_programs == []


def test_an_image_replaced_by_a_fifo_or_device_shows_its_error_without_blocking(tmp_path):
    run_dir, photo = _one_image_run(str(tmp_path), {})
    os.remove(photo)
    os.mkfifo(photo)
    note = within(60, _card_note, run_dir, photo)
    assert note.startswith("image unavailable: NotARegularFile: not a regular file"), note
    assert "FIFO" in note
    os.remove(photo)
    os.symlink("/dev/zero", photo)
    os.remove(os.path.join(run_dir, "report.html"))
    assert "a character device" in within(60, _card_note, run_dir, photo)


def test_names_that_are_not_utf8_are_shown_as_the_records_hold_them(tmp_path):
    top = os.path.join(str(tmp_path), os.fsdecode(b"d\xe9p\xf4t"))  # the run directory's own name too
    os.makedirs(top)
    photo = os.path.join(top, os.fsdecode(b"caf\xe9.jpg"))
    Image.new("RGB", (120, 90), COLOURS["red"]).save(photo, "JPEG")
    run_dir = os.path.join(top, "out", "run=r1")
    os.makedirs(run_dir)
    gone = os.path.join(top, os.fsdecode(b"\xff\xfe.png"))
    error = {"path": gone, "stage": "read", "error": "FileNotFoundError",
             "message": f"no such file: {gone} \ud800", "run_id": "r1"}
    for name, record in (("captions", _caption(photo, "a red square", -1.0)), ("errors", error)):
        with open(os.path.join(run_dir, f"{name}-00000-of-00001.jsonl"), "w") as f:
            f.write(json.dumps(record) + "\n")  # as records.py writes them: \udcXX escapes
    with open(os.path.join(run_dir, "manifest.json"), "w") as f:
        json.dump({"run_id": "r1", "counts": {"captioned": 1, "failed": 1}, "options": {}}, f)
    done = subprocess.run([sys.executable, "-m", "batch_caption.report", os.fsencode(run_dir)],
                          capture_output=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr[-2000:]
    page_path = done.stdout.strip()
    assert page_path == os.fsencode(os.path.join(run_dir, "report.html"))
    page = open(page_path, encoding="utf-8").read()  # valid UTF-8
    dom = parse(page)
    shown = os.fsencode(photo).decode("utf-8", "backslashreplace")
    assert shown.endswith("caf\\xe9.jpg") and shown in _cards(dom)
    assert _cards(dom)[shown].find("img", "thumb") is not None  # read through its real name
    assert "\\xff\\xfe.png" in page and "\\ud800" in page


@pytest.mark.parametrize("options, error", [
    ({"max_image_pixels": 120 * 90 - 1}, "ImageTooLargeError: image is 120x90 = 10,800 pixels (JPEG), over the limit"),
    ({"max_file_bytes": 100}, "FileTooLargeError: file is larger than the limit of 100 bytes"),
])
def test_thumbnails_keep_the_runs_limits(tmp_path, options, error):
    run_dir, photo = _one_image_run(str(tmp_path), options)
    assert _card_note(run_dir, photo).startswith(f"image unavailable: {error}")


def test_unusable_decoder_options_fall_back_to_the_jobs_defaults(tmp_path):
    from batch_caption.pipeline.config import JobConfig
    from batch_caption.report import thumbnails

    run_dir, photo = _one_image_run(str(tmp_path), {"max_image_pixels": "many"})
    dom = parse(open(report_page.run([run_dir]), encoding="utf-8").read())
    assert _cards(dom)[photo].find("img", "thumb") is not None
    assert any("decoder options are not usable" in n.text() for n in dom.find_all("p", "note"))
    decoding, note = thumbnails.run_decoding(None, 64)
    assert note is None and decoding.max_file_bytes == JobConfig.max_file_bytes
    assert (decoding.image.max_image_pixels, decoding.image.draft) == (JobConfig.max_image_pixels, JobConfig.draft)
    assert decoding.image.formats == image_decoding.DEFAULT_FORMATS and "EPS" not in image_decoding.DEFAULT_FORMATS


def test_max_images_caps_cards_but_not_errors(run_dir):
    run_dir, captions, errors = run_dir
    dom = parse(open(report_page.run([run_dir, "--max_images", "2"]), encoding="utf-8").read())
    assert [c.attrs["data-path"] for c in dom.find_all("article", "card")] == sorted(r["path"] for r in captions)[:2]
    assert "first 2 of 5" in dom.find("p", "truncated").text()
    assert len(dom.find_all("tr", "error-row")) == len(errors)
    dom = parse(open(report_page.run([run_dir, "--max_images", "0"]), encoding="utf-8").read())
    assert dom.find_all("article", "card") == [] and "first 0 of 5" in dom.find("p", "truncated").text()
    dom = parse(open(report_page.run([run_dir]), encoding="utf-8").read())
    assert dom.find("p", "truncated") is None


def test_no_manifest_still_renders(tmp_path):
    run_dir, captions, errors = make_run(str(tmp_path), manifest=False)
    dom = parse(open(report_page.run([run_dir]), encoding="utf-8").read())
    assert dom.find("p", "incomplete").text() == "incomplete run: no manifest"
    assert dom.find(cls="run-id").text() == "r1"  # from the directory name
    assert len(dom.find_all("article", "card")) == len(captions)
    assert len(dom.find_all("tr", "error-row")) == len(errors)


def test_bad_lines_and_count_mismatch_are_noted(run_dir):
    run_dir, _, _ = run_dir
    with open(os.path.join(run_dir, "captions-00000-of-00001.jsonl"), "a") as f:
        f.write("not json\n[1, 2]\n")
    os.remove(os.path.join(run_dir, "errors-00000-of-00001.jsonl"))
    notes = [n.text() for n in parse(open(report_page.run([run_dir]), encoding="utf-8").read()).find_all("p", "note")]
    assert "2 line(s) in the caption files are not caption records and were skipped" in notes
    assert "the manifest counts 3 failed but the files hold 0 records" in notes


def test_missing_run_dir_and_bad_flags_exit_2(tmp_path, capsys):
    assert report_page.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batch_caption.report: error: run directory ") and err.count("\n") == 1
    assert report_page.main([str(tmp_path), "--thumbnail_size", "5"]) == 2
    assert report_page.main([str(tmp_path), "--max_images", "x"]) == 2
    assert report_page.main([]) == 2
    assert all(line.startswith("batch_caption.report: error: ") for line in capsys.readouterr().err.splitlines())


def test_cli(run_dir, tmp_path):
    run_dir, _, _ = run_dir
    out = str(tmp_path / "sub" / "page.html")
    proc = subprocess.run([sys.executable, "-m", "batch_caption.report", run_dir, "--output", out],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == out and os.path.getsize(out) > 1000


def test_gcs_run_dir(gcs_emulator, tmp_path):
    from google.cloud import storage

    local, captions, errors = make_run(str(tmp_path))
    bucket = storage.Client.create_anonymous_client().bucket(gcs_emulator)
    bucket.blob("report-test/images/red.png").upload_from_filename(captions[0]["path"])
    captions[0]["path"] = f"gs://{gcs_emulator}/report-test/images/red.png"
    _write_jsonl(os.path.join(local, "captions-00000-of-00001.jsonl"), captions)
    for name in os.listdir(local):
        bucket.blob(f"report-test/run=r1/{name}").upload_from_filename(os.path.join(local, name))
    gs_run = f"gs://{gcs_emulator}/report-test/run=r1"
    assert report_page.run([gs_run]) == f"{gs_run}/report.html"
    dom = parse(bucket.blob("report-test/run=r1/report.html").download_as_text())
    cards = _cards(dom)
    assert sorted(cards) == sorted(r["path"] for r in captions)
    assert len(dom.find_all("tr", "error-row")) == len(errors)
    assert cards[captions[0]["path"]].find("img", "thumb") is not None  # read from gs://
    assert report_page.main([f"gs://{gcs_emulator}/report-test/run=nope"]) == 2


# --- a real browser --------------------------------------------------------------------


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium():
    """Path of Debian's chromium, installed with apt-get when missing (CI: root on Debian)."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get): "
                    "run `apt-get install -y chromium` (or .ci/install_chromium.sh) first")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"apt-get install chromium did not provide {CHROMIUM}")
    return CHROMIUM


def _headless(chromium, tmp_path, url, *args, timeout=60):
    """Runs headless chromium on `url`, isolated (own profile and HOME, no network services)."""
    home = tmp_path / "chromium-home"
    home.mkdir(exist_ok=True)
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
           "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={home / 'profile'}", *args, url]
    # Own process group: on a timeout, its renderer and zygote processes go too.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HOME": str(home)}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {timeout} s: {' '.join(cmd)}")
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {err[-3000:]}"
    return out


def test_in_a_real_browser(chromium, run_dir, tmp_path):
    run_dir, captions, errors = run_dir
    page = report_page.run([run_dir, "--thumbnail_size", "64"])
    url = pathlib.Path(page).as_uri()

    # The DOM the browser built from the page.
    dom = parse(_headless(chromium, tmp_path, url, "--dump-dom"))
    assert dom.find("title") is not None and dom.find("title").text() == "Captions: r1"
    cards = _cards(dom)
    assert sorted(cards) == sorted(r["path"] for r in captions)
    assert len(dom.find_all("article", "card")) == len(captions)
    assert len(dom.find_all("tr", "error-row")) == len(errors)
    evil = cards[captions[3]["path"]]
    assert evil.find("p", "caption").text() == captions[3]["caption"]  # the markup is text
    assert evil.find("p", "caption").find_all() == [evil.find("p", "caption")]  # ... and nothing else
    assert [f.text() for f in evil.find_all("li", "flag")] == ["unknown_word", "<img src=x onerror=alert(2)>"]
    body = dom.find("body")
    assert body is not None and body.find_all("script") == [] and dom.find_all("script") == []
    assert not [n.tag for n in dom.iter() if any(a.startswith("on") for a in n.attrs)]
    imgs = body.find_all("img")
    assert len(imgs) == len(captions) - 1 and all(i.attrs["src"].startswith("data:image/jpeg;base64,") for i in imgs)
    assert cards[captions[4]["path"]].find("p", "missing") is not None

    # What it drew: each solid-colour thumbnail is on screen, so data: images decoded under the CSP.
    shot = tmp_path / "shot.png"
    _headless(chromium, tmp_path, url, f"--screenshot={shot}", "--window-size=1200,2400")
    with Image.open(shot) as im:
        assert im.size == (1200, 2400)
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    for colour in [*COLOURS.values(), (255, 255, 0)]:
        near = int((np.abs(pixels - np.array(colour)).max(axis=-1) < 24).sum())
        assert near > 0.8 * 64 * 48, f"thumbnail {colour} not drawn ({near} pixels)"

    # The Content-Security-Policy itself blocks scripts: a script smuggled into the page
    # does not run, while the same page without the policy lets it run (so the check works).
    smuggled = '<script>document.body.setAttribute("data-ran", "yes")</script>'
    html_text = open(page, encoding="utf-8").read()
    with_csp = tmp_path / "with_csp.html"
    with_csp.write_text(html_text.replace("<body>", "<body>" + smuggled, 1), encoding="utf-8")
    without_csp = tmp_path / "without_csp.html"
    csp_tag = html_text[html_text.index('<meta http-equiv="Content-Security-Policy"'):]
    csp_tag = csp_tag[: csp_tag.index(">") + 1]
    without_csp.write_text(with_csp.read_text(encoding="utf-8").replace(csp_tag, ""), encoding="utf-8")
    ran = parse(_headless(chromium, tmp_path, with_csp.as_uri(), "--dump-dom")).find("body").attrs
    assert "data-ran" not in ran
    ran = parse(_headless(chromium, tmp_path, without_csp.as_uri(), "--dump-dom")).find("body").attrs
    assert ran.get("data-ran") == "yes"


# --- attention maps --------------------------------------------------------------------


def _with_attention(run_dir, attention_by_path):
    """Rewrites run_dir's caption records, adding "attention" to those in `attention_by_path`."""
    path = os.path.join(run_dir, "captions-00000-of-00001.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        if row["path"] in attention_by_path:
            row["attention"] = attention_by_path[row["path"]]
    _write_jsonl(path, rows)


def _custom_properties(node):
    """{"--name": "value"} of a node's style attribute."""
    pairs = (p.split(":", 1) for p in node.attrs.get("style", "").split(";") if p.startswith("--"))
    return {k: v for k, v in pairs}


def test_attention_overlay_cells_and_word_maps(run_dir):
    run_dir, captions, _ = run_dir
    red = {"grid": [2, 3], "words": ["a", "red", "square"],
           "percent": [[50, 10, 10, 10, 10, 10], [0, 0, 0, 0, 25, 75], [17, 17, 16, 17, 17, 16]]}
    evil_words = captions[3]["caption"].split()  # markup and quotes, as words
    evil = {"grid": [1, 1], "words": evil_words, "percent": [[100]] * len(evil_words)}
    _with_attention(run_dir, {captions[0]["path"]: red, captions[3]["path"]: evil})
    page = open(report_page.run([run_dir]), encoding="utf-8").read()
    assert "<script" not in page.lower() and ".w3:hover" in page and ".w4:hover" not in page
    cards = _cards(parse(page))

    card = cards[captions[0]["path"]]
    grid = card.find("div", "attn-grid")
    assert card.find("div", "attn").find("img", "thumb") is not None  # the grid lies over the thumbnail
    assert grid.attrs["style"].startswith("grid-template:repeat(2,1fr)/repeat(3,1fr);")
    cells = grid.find_all("i", "cell")
    assert len(cells) == 6
    for c, cell in enumerate(cells):  # each cell holds every word's percent for it
        props = _custom_properties(cell)
        assert props == {f"--p{w}": str(row[c]) for w, row in enumerate(red["percent"])}
    scales = _custom_properties(grid)  # each word's strongest cell is drawn at MAX_OPACITY
    assert {k: float(v) for k, v in scales.items()} == pytest.approx(
        {f"--s{w}": overlay.MAX_OPACITY / max(row) for w, row in enumerate(red["percent"])}, rel=1e-3)
    words = card.find("p", "caption").find_all("span", "word")
    assert [(w.text(), w.attrs["tabindex"]) for w in words] == [("a", "0"), ("red", "0"), ("square", "0")]
    assert [f"w{i}" in w.classes for i, w in enumerate(words)] == [True] * 3
    assert card.find("p", "caption").text() == "a red square"

    card = cards[captions[3]["path"]]  # untrusted words stay text
    assert card.find("p", "caption").text() == captions[3]["caption"]
    assert [w.text() for w in card.find_all("span", "word")] == evil_words
    assert len(card.find_all("i", "cell")) == 1
    for path in (r["path"] for r in captions[1:3]):  # records without attention: no overlay
        assert cards[path].find("div", "attn") is None and cards[path].find("span", "word") is None


def test_attention_words_keep_the_captions_punctuation(tmp_path):
    record = {"caption": "a dog, on grass.",
              "attention": {"grid": [1, 2], "words": ["a", "dog", ",", "on", "grass", "."],
                            "percent": [[40, 60]] * 6}}
    attention = overlay.parse(record)
    words = parse(f"<p>{overlay.caption_words(attention)}</p>").find("p")
    assert words.text() == "a dog, on grass."
    assert [w.text() for w in words.find_all("span", "word")] == ["a", "dog", ",", "on", "grass", "."]


GOOD_ATTENTION = {"grid": [1, 2], "words": ["a", "blue", "square"], "percent": [[40, 60], [90, 10], [50, 50]]}


@pytest.mark.parametrize("bad", [
    "x", [], {"grid": [1, 2]},
    {**GOOD_ATTENTION, "grid": [2]}, {**GOOD_ATTENTION, "grid": [0, 2]}, {**GOOD_ATTENTION, "grid": [1, "2"]},
    {**GOOD_ATTENTION, "grid": [True, 2]}, {**GOOD_ATTENTION, "grid": [1, 2.0]}, {**GOOD_ATTENTION, "grid": None},
    {**GOOD_ATTENTION, "words": []}, {**GOOD_ATTENTION, "words": ["a", 2, "square"]},
    {**GOOD_ATTENTION, "words": ["a", "", "blue", "square"], "percent": [[50, 50]] * 4},
    {**GOOD_ATTENTION, "words": ["a", "red", "square"]},  # not the caption's words
    {**GOOD_ATTENTION, "words": ["a", "blue"], "percent": [[40, 60], [90, 10]]},  # a word short
    {**GOOD_ATTENTION, "percent": [[40, 60], [90, 10]]},  # a row short
    {**GOOD_ATTENTION, "percent": [[40, 60], [90, 10], [50]]},  # a cell short
    {**GOOD_ATTENTION, "percent": [[40, 60], [90, 10], [50, 50, 0]]},
    {**GOOD_ATTENTION, "percent": [[40, 60], [90, "10"], [50, 50]]},
    {**GOOD_ATTENTION, "percent": [[40, 60], [90, None], [50, 50]]},
    {**GOOD_ATTENTION, "percent": [[40, 60], [90, float("nan")], [50, 50]]},
    {**GOOD_ATTENTION, "percent": [[40, 60], [90, -1], [50, 50]]},
    {**GOOD_ATTENTION, "percent": [[40, 60], [90, 101], [50, 50]]},
    {**GOOD_ATTENTION, "percent": [[40, 60], [90, False], [50, 50]]},
    {**GOOD_ATTENTION, "percent": "40 60"},
])
def test_malformed_attention_is_ignored(run_dir, bad):
    """A card with malformed attention is byte for byte the card without it."""
    run_dir, captions, _ = run_dir
    blue = captions[2]["path"]
    page = report_page.run([run_dir])
    plain = open(page, encoding="utf-8").read()
    _with_attention(run_dir, {blue: bad})
    assert overlay.parse({"caption": "a blue square", "attention": bad}) is None
    assert overlay.parse({"caption": "a blue square", "attention": GOOD_ATTENTION}) is not None
    got = open(report_page.run([run_dir]), encoding="utf-8").read()
    footer = '<footer><p class="meta">Generated by batch_caption.report at '
    assert got.split(footer)[0] == plain.split(footer)[0]


def test_attention_overlay_in_a_real_browser(chromium, tmp_path):
    """Focusing a word (what a keyboard user does; hovering takes the same rule) draws that
    word's map over the thumbnail; with no word focused the thumbnail shows as it is."""
    run_dir, photo = _one_image_run(str(tmp_path))
    Image.new("RGB", (120, 90), COLOURS["blue"]).save(photo, "JPEG")
    _with_attention(run_dir, {photo: {"grid": [2, 2], "words": ["a", "red", "square"],
                                      "percent": [[100, 0, 0, 0], [0, 0, 0, 100], [25, 25, 25, 25]]}})
    page = report_page.run([run_dir])
    html_text = open(page, encoding="utf-8").read()
    assert html_text.count('class="word w1"') == 1

    def quadrants(path):
        """The mean colour of each quarter of the thumbnail (found as the non-white area)."""
        _headless(chromium, tmp_path, pathlib.Path(path).as_uri(), f"--screenshot={tmp_path / 'shot.png'}",
                  "--window-size=800,600")
        with Image.open(tmp_path / "shot.png") as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        ys, xs = np.nonzero((np.abs(pixels - [0, 0, 255]).max(axis=-1) < 40))
        top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        assert (right - left, bottom - top) == (120, 90), "the thumbnail is not where the test looks for it"
        my, mx = (top + bottom) // 2, (left + right) // 2
        return [pixels[y0 + 5:y1 - 5, x0 + 5:x1 - 5].mean(axis=(0, 1))
                for y0, y1 in ((top, my), (my, bottom)) for x0, x1 in ((left, mx), (mx, right))]

    for colour in quadrants(page):  # nothing focused: no cell drawn
        assert np.abs(colour - [0, 0, 255]).max() < 24, colour
    focused = tmp_path / "focused.html"
    focused.write_text(html_text.replace('class="word w1"', 'class="word w1" autofocus'), encoding="utf-8")
    # "red" looked at the bottom-right cell only: it is drawn at MAX_OPACITY, the rest not.
    mixed = overlay.MAX_OPACITY * np.array([255, 212, 0]) + (1 - overlay.MAX_OPACITY) * np.array(
        [0, 0, 255])
    *others, bottom_right = quadrants(focused)
    assert np.abs(bottom_right - mixed).max() < 24, bottom_right
    for colour in others:
        assert np.abs(colour - [0, 0, 255]).max() < 24, colour
