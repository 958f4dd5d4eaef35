"""`python -m batch_caption.report`: a static HTML page for browsing one run's output.

    python -m batch_caption.report RUN_DIR [--output FILE] [--thumbnail_size 160] [--max_images N]

Reads RUN_DIR (``OUTPUT/run=<id>/``, local, gs:// or any Beam filesystem): ``manifest.json``,
``captions-*.jsonl`` and ``errors-*.jsonl`` (see :mod:`batch_caption.records`), and writes one
self-contained page (default ``RUN_DIR/report.html``):

* a header with the manifest's counts (inputs, captioned, failed by stage), model id, run
  id and times - or "incomplete run: no manifest" when the run never finished;
* one card per caption record, sorted by path, at most ``--max_images`` (a note says when
  the list is cut): a JPEG thumbnail embedded as a ``data:`` URI (the image at ``path``
  read and decoded with the run's own settings, see :mod:`batch_caption.report.thumbnails`;
  when that fails the card says why), the caption and its score, the alternatives with theirs,
  quality flags when the record has them, size and path; with the record's attention
  maps (--attention_maps), a grid over the thumbnail showing the map of the caption's
  hovered or focused word (see :mod:`batch_caption.report.overlay`);
* a table with every error record (path, stage, error, message).

The page loads nothing: no scripts, fonts or remote images; a Content-Security-Policy
allows only inline CSS and data: images. Every piece of text from the run is escaped.

Exit codes: 0 written (its path on stdout); 2 bad flags or no such run directory, with a
one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import calendar
import collections
import concurrent.futures
import heapq
import html
import io
import json
import os
import sys
import time
from typing import Any, Iterator

from batch_caption import catalog, cli, quiet, records
from batch_caption.cli import UsageError
from batch_caption.report import overlay, thumbnails
from batch_caption.storage import files, gcs

REPORT_NAME = "report.html"
DEFAULT_MAX_IMAGES = 2000
DEFAULT_THUMBNAIL_SIZE = 160
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_THREADS = 16  # thumbnails are I/O bound on object stores

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .4em}h2{font-size:1.15em;margin:1.5em 0 .5em}
.note{background:#fff3cd;border:1px solid #e0c36b;padding:.4em .7em;margin:.5em 0}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
.summary td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:.8em;align-items:start}
.card{background:#fff;border:1px solid #ddd;border-radius:4px;padding:.6em;overflow-wrap:anywhere}
.thumb{display:block;margin:0 auto .5em;max-width:100%;height:auto}
.missing{background:#f8d7da;color:#721c24;padding:1em .5em;text-align:center;margin-bottom:.5em}
.caption{font-weight:600;margin:.2em 0}.score,.alt-score,.meta{color:#666}
.alternatives{margin:.3em 0;padding-left:1.4em}
.flags{margin:.3em 0;padding:0;list-style:none}
.flag{display:inline-block;background:#fde2c8;color:#8a4b08;border-radius:3px;padding:0 .4em;margin:0 .3em .2em 0;font-size:.85em}
.path{font-family:ui-monospace,monospace;font-size:.85em;overflow-wrap:anywhere;word-break:break-all}
.errors td.message{max-width:40em;overflow-wrap:anywhere}
"""


def _e(value: Any) -> str:
    """Text -> HTML, quotes included (safe in element content and attribute values)."""
    return html.escape(_display(str(value)), quote=True)


def _display(text: str) -> str:
    """`text` as UTF-8 can hold it: a name that is not UTF-8 (surrogate escapes, as the
    records hold it) shows its undecodable bytes as \\xNN, as the catalog's `path` does;
    any other lone surrogate as \\udXXX."""
    try:
        return catalog.utf8_text(text)
    except UnicodeEncodeError:  # a surrogate no byte escapes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _fs():
    """Beam's FileSystems, for what batch_caption.storage.files does not do: streamed reads, and a
    listing that stops at the first file."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


# --- reading the run -------------------------------------------------------------------


def check_run_dir(run_dir: str) -> None:
    """Raises UsageError unless `run_dir` exists (on object stores: holds any object)."""
    if not files.is_remote(run_dir):
        if not os.path.exists(run_dir):
            raise UsageError(f"run directory {run_dir} does not exist")
        if not os.path.isdir(run_dir):
            raise UsageError(f"{run_dir} is not a directory")
        return
    try:
        found = _fs().match([files.join(run_dir, "*")], limits=[1])[0].metadata_list
    except Exception as e:  # Beam filesystems raise their own error types
        raise UsageError(f"cannot list run directory {run_dir}: {type(e).__name__}: {e}") from None
    if not found:
        raise UsageError(f"run directory {run_dir} does not exist (no files under it)")


def _match(run_dir: str, pattern: str) -> list[str]:
    try:
        return sorted(files.matched(files.join(run_dir, pattern)))
    except Exception:  # nothing matched (some filesystems raise instead of returning [])
        return []


def read_manifest(run_dir: str) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why it is missing or unreadable)."""
    path = files.join(run_dir, records.MANIFEST_NAME)
    if not files.exists(path):
        return None, "incomplete run: no manifest"
    try:
        manifest = json.loads(files.read_text(path))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except Exception as e:
        return None, f"unreadable manifest: {type(e).__name__}: {e}"
    return manifest, None


class _Records:
    """Streams the records of a run's shards, counting lines that are not records."""

    def __init__(self, files: list[str]):
        self.files = files
        self.count = 0
        self.bad_lines = 0

    def __iter__(self) -> Iterator[dict]:
        for path in self.files:
            with io.TextIOWrapper(_fs().open(path), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        record = None
                    if not (isinstance(record, dict) and isinstance(record.get("path"), str)):
                        self.bad_lines += 1
                        continue
                    self.count += 1
                    yield record


# --- HTML ------------------------------------------------------------------------------


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return "?" if value is None else str(value)


def _duration(manifest: dict) -> str | None:
    try:
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        start = calendar.timegm(time.strptime(manifest["start_time"], fmt))
        end = calendar.timegm(time.strptime(manifest["end_time"], fmt))
    except (KeyError, TypeError, ValueError):
        return None
    return f"{end - start:,.0f} s"


def _header(run_dir: str, manifest: dict | None, problem: str | None, n_captions: int, n_errors: int,
            notes: list[str]) -> list[str]:
    run_id = (manifest or {}).get("run_id") or run_dir.rstrip("/").rsplit("/", 1)[-1].removeprefix("run=")
    out = [f'<header><h1>Captions of run <span class="run-id">{_e(run_id)}</span></h1>',
           f'<p>run directory <span class="path run-dir">{_e(run_dir)}</span></p>']
    if problem:
        out.append(f'<p class="note incomplete">{_e(problem)}</p>')
    rows: list[tuple[str, str, Any]] = []  # (data-count key, label, value)
    if manifest is not None:
        counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
        rows += [(k, k, counts[k]) for k in ("matched", "inputs", "captioned", "failed") if k in counts]
        by_stage = counts.get("failed_by_stage") if isinstance(counts.get("failed_by_stage"), dict) else {}
        stages = [s for s in records.STAGES if s in by_stage] + sorted(set(by_stage) - set(records.STAGES))
        rows += [(f"failed:{s}", f"failed at {s}", by_stage[s]) for s in stages]
        if counts.get("skipped"):
            rows.append(("skipped", "skipped", counts["skipped"]))
    rows += [("records:captions", "caption records in files", n_captions),
             ("records:errors", "error records in files", n_errors)]
    out.append('<table class="summary"><tbody>')
    for key, label, value in rows:
        shown = f"{value:,}" if isinstance(value, int) else value
        out.append(f'<tr data-count="{_e(key)}"><th>{_e(label)}</th><td class="n">{_e(shown)}</td></tr>')
    out.append("</tbody></table>")
    if manifest is not None:
        info = [("run id", manifest.get("run_id")), ("model", manifest.get("model")),
                ("model path", manifest.get("model_path")), ("started", manifest.get("start_time")),
                ("finished", manifest.get("end_time")), ("took", _duration(manifest)),
                ("format", manifest.get("format"))]
        out.append('<table class="run-info"><tbody>')
        out += [f'<tr data-info="{_e(k)}"><th>{_e(k)}</th><td>{_e(v)}</td></tr>' for k, v in info if v is not None]
        out.append("</tbody></table>")
        options = manifest.get("options")
        if isinstance(options, dict) and options:
            out.append('<details class="options"><summary>options</summary><table><tbody>')
            out += [f"<tr><th>{_e(k)}</th><td>{_e(json.dumps(v))}</td></tr>" for k, v in sorted(options.items())]
            out.append("</tbody></table></details>")
        counts = manifest.get("counts") or {}
        if isinstance(counts, dict):  # the files should hold exactly what the manifest counted
            for key, found in (("captioned", n_captions), ("failed", n_errors)):
                if isinstance(counts.get(key), int) and counts[key] != found:
                    notes.append(f"the manifest counts {counts[key]:,} {key} but the files hold {found:,} records")
    out += [f'<p class="note">{_e(n)}</p>' for n in notes]
    out.append("</header>")
    return out


def _card(record: dict, thumb: tuple[str, int, int] | str,
          attention: overlay.Attention | None = None) -> str:
    path = record["path"]
    out = [f'<article class="card" data-path="{_e(path)}">']
    attention = attention if isinstance(thumb, tuple) else None  # nothing to lay a map over
    if isinstance(thumb, tuple):
        uri, w, h = thumb
        img = f'<img class="thumb" src="{_e(uri)}" width="{w}" height="{h}" alt="{_e(path)}">'
        out.append(f'<div class="attn">{img}{overlay.overlay(attention)}</div>' if attention else img)
    else:
        out.append(f'<p class="missing">image unavailable: {_e(thumb)}</p>')
    caption = overlay.caption_words(attention) if attention else _e(record.get("caption", ""))
    out.append(f'<p class="caption">{caption}</p>')
    out.append(f'<p class="score">score <span class="value">{_e(_number(record.get("score")))}</span>'
               f' (log-prob {_e(_number(record.get("logprob")))})</p>')
    alternatives = [a for a in record.get("alternatives") or [] if isinstance(a, dict)]
    if alternatives:
        out.append('<ol class="alternatives" start="2">')
        out += [f'<li class="alternative"><span class="alt-caption">{_e(a.get("caption", ""))}</span>'
                f' <span class="alt-score">{_e(_number(a.get("score")))}</span></li>' for a in alternatives]
        out.append("</ol>")
    flags = record.get("flags")
    if flags:
        flags = flags if isinstance(flags, list) else [flags]
        out.append('<ul class="flags">' + "".join(f'<li class="flag">{_e(f)}</li>' for f in flags) + "</ul>")
    size = f"{record.get('width', '?')} \u00d7 {record.get('height', '?')}"
    fmt = f" {record['format']}" if record.get("format") else ""
    out.append(f'<p class="meta"><span class="size">{_e(size)}</span>{_e(fmt)}</p>')
    out.append(f'<p class="path">{_e(path)}</p>')
    out.append("</article>")
    return "\n".join(out)


def _errors_table(errors: list[dict]) -> list[str]:
    out = [f'<section id="errors"><h2>Errors ({len(errors):,})</h2>']
    if not errors:
        return out + ['<p class="none">No errors.</p>', "</section>"]
    out.append('<table class="errors"><thead><tr><th>path</th><th>stage</th><th>error</th><th>message</th></tr>'
               "</thead><tbody>")
    for r in errors:
        path, stage, error, message = (_e(r.get(k, "")) for k in ("path", "stage", "error", "message"))
        out.append(f'<tr class="error-row" data-path="{path}" data-stage="{stage}"><td class="path">{path}</td>'
                   f'<td class="stage">{stage}</td><td class="error">{error}</td><td class="message">{message}</td></tr>')
    return out + ["</tbody></table>", "</section>"]


def render(run_dir: str, thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
           max_images: int = DEFAULT_MAX_IMAGES) -> str:
    """The report page of the run at `run_dir` (which must exist), as a string."""
    manifest, problem = read_manifest(run_dir)
    captions = _Records(_match(run_dir, "captions-*.jsonl"))
    # Only the first max_images paths are kept in memory, however large the run.
    stream = iter(captions)
    shown = heapq.nsmallest(max_images, stream, key=lambda r: r["path"])
    collections.deque(stream, maxlen=0)  # nsmallest(0, ...) reads nothing: still count the rest
    errors_in = _Records(_match(run_dir, "errors-*.jsonl"))
    errors = sorted(errors_in, key=lambda r: (r["path"], str(r.get("stage", ""))))

    notes = []
    if not captions.files and not errors_in.files:
        notes.append("no captions-*.jsonl or errors-*.jsonl files in this directory")
    for what, source in (("caption", captions), ("error", errors_in)):
        if source.bad_lines:
            notes.append(f"{source.bad_lines:,} line(s) in the {what} files are not {what} records and were skipped")

    decoding, unusable = thumbnails.run_decoding(manifest, thumbnail_size)
    if unusable:
        notes.append(unusable)
    with concurrent.futures.ThreadPoolExecutor(max_workers=_THREADS) as pool:
        thumbs = list(pool.map(lambda r: thumbnails.safe_thumbnail(r["path"], decoding), shown))
    attentions = [overlay.parse(r) for r in shown]
    max_words = max((len(a.words) for a in attentions if a), default=0)

    title = f"Captions: {(manifest or {}).get('run_id') or run_dir}"
    page = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="referrer" content="no-referrer">',
            f"<title>{_e(title)}</title>",
            f"<style>{_CSS}{overlay.css(max_words) if max_words else ''}</style></head>", "<body>"]
    page += _header(run_dir, manifest, problem, captions.count, errors_in.count, notes)
    page.append(f'<section id="captions"><h2>Captions ({captions.count:,})</h2>')
    if captions.count > len(shown):
        page.append(f'<p class="note truncated">Showing the first {len(shown):,} of {captions.count:,} captioned '
                    "images (sorted by path); raise --max_images to see more.</p>")
    page.append('<div class="cards">')
    page += [_card(r, t, a) for r, t, a in zip(shown, thumbs, attentions)]
    page.append("</div></section>")
    page += _errors_table(errors)
    page.append(f'<footer><p class="meta">Generated by batch_caption.report at '
                f'{_e(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))}.</p></footer>')
    page.append("</body></html>\n")
    return "\n".join(page)


# --- CLI -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m batch_caption.report",
        description="Write a static, self-contained HTML page for one run: its manifest counts, a card per "
        "captioned image (thumbnail, caption, score, alternatives, flags) and every error record.",
        epilog="RUN_DIR may be local, gs:// or any Beam filesystem. Exit codes: 0 written, 2 bad flags or no "
        "such run directory.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, OUTPUT/run=<id>/")
    p.add_argument("--output", default=None, metavar="FILE",
                   help=f"where to write the page, local or gs:// (default RUN_DIR/{REPORT_NAME})")
    p.add_argument("--thumbnail_size", type=int, default=DEFAULT_THUMBNAIL_SIZE, metavar="PX",
                   help=f"longest thumbnail side in pixels, 16-1024 (default {DEFAULT_THUMBNAIL_SIZE})")
    p.add_argument("--max_images", type=int, default=DEFAULT_MAX_IMAGES, metavar="N",
                   help="cards for at most the first N paths (sorted); errors are always all listed "
                   f"(default {DEFAULT_MAX_IMAGES})")
    quiet.add_verbose_flag(p)
    return p


def run(argv: list[str] | None = None) -> str:
    """Writes the report; returns its path. Raises UsageError on bad flags or a missing run dir."""
    args = build_parser().parse_args(argv)
    if not 16 <= args.thumbnail_size <= 1024:
        raise UsageError(f"--thumbnail_size must be between 16 and 1024, got {args.thumbnail_size}")
    if args.max_images < 0:
        raise UsageError(f"--max_images must be >= 0, got {args.max_images}")
    gcs.require_credentials([args.run_dir, args.output])
    gcs.configure_for_emulator()
    run_dir = args.run_dir
    check_run_dir(run_dir)
    output = args.output or files.join(run_dir, REPORT_NAME)
    page = render(run_dir, args.thumbnail_size, args.max_images)
    try:
        files.write_bytes(output, page.encode("utf-8"), mime_type="text/html")
    except Exception as e:  # Beam filesystems raise their own error types
        raise UsageError(f"cannot write --output {output}: {type(e).__name__}: {e}") from None
    return output


def main(argv: list[str] | None = None) -> int:
    quiet.setup_when_command_line(argv)
    try:
        path = run(argv)
    except UsageError as e:
        print(f"batch_caption.report: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    # The path as given: its own bytes, even where they are not UTF-8.
    sys.stdout.flush()
    sys.stdout.buffer.write(os.fsencode(path) + b"\n")
    sys.stdout.buffer.flush()
    return 0

