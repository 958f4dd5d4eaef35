"""The job's output contracts: caption records, error records, the run manifest.

Caption record (one JSON object a line, keys sorted, no NaN), `captions-*.jsonl`:
    path, caption, score, logprob, alternatives [{caption, score, logprob}] (the n-best
    after the first), flags (quality.py), width, height, format, bytes, sha256,
    modified (file time, seconds since the epoch, null when unknown), model, run_id,
    decode {beam_size, max_length, num_alternatives, length_normalization}; with
    --attention_maps also attention {grid [rows, cols], words, percent [word][cell]}
Error record, `errors-*.jsonl`:
    path, stage (match | read | decode | infer | write), error (exception class name),
    message, run_id, and what was known of the file: bytes, modified, sha256 (null when
    unknown: a match error names a pattern or directory, not a file)
Manifest, `manifest.json`, written last: a run directory without it is incomplete.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from batch_caption import quality

STAGES = ("match", "read", "decode", "infer", "write")
# Dataset preparation also rejects captions (empty after tokenisation, unknown image).
PREPARE_STAGES = STAGES + ("caption",)
MANIFEST_NAME = "manifest.json"
# 2: catalog files; read, carried, deleted counts. 3: the catalog's flags, width, height.
MANIFEST_FORMAT = "batch_caption.run/3"
# A run id names a directory (run=<id>) and appears in every record.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RUN_ID_RULE = "must be letters, digits, '.', '_' or '-' (max 128)"


def check_run_id(run_id: str) -> None:
    """Raises ValueError naming the rule when `run_id` cannot name a run directory."""
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"--run_id {run_id!r} {RUN_ID_RULE}")


def _finite(x: float) -> float:
    # JSON has no NaN/inf; a non-finite score means the model is broken, not the image.
    if not math.isfinite(x):
        raise ValueError(f"non-finite score {x}")
    return round(float(x), 6)


def caption_record(
    example,
    captions,
    *,
    model_id: str,
    run_id: str,
    decode: dict[str, Any],
    low_score_threshold: float,
    path: str | None = None,
    modified: float | None = None,
) -> dict[str, Any]:
    """Record for one file: `example` an inference.ImageExample, `captions` its n-best;
    `path`/`modified` name one of the example's files (default: example.path)."""
    if not captions:
        raise ValueError("no caption was produced")
    best = captions[0]
    return portable({
        "path": path or example.path,
        "modified": modified,
        "caption": best.text,
        "score": _finite(best.score),
        "logprob": _finite(best.logprob),
        "alternatives": [
            {"caption": c.text, "score": _finite(c.score), "logprob": _finite(c.logprob)} for c in captions[1:]
        ],
        "flags": quality.caption_flags(best.text, best.score, low_score_threshold, best.truncated),
        "width": example.width,
        "height": example.height,
        "format": example.format,
        "bytes": example.size_bytes,
        "sha256": example.sha256,
        "model": model_id,
        "run_id": run_id,
        "decode": decode,
        **({"attention": attention_field(best.attention)} if best.attention is not None else {}),
    })


def attention_field(attention) -> dict[str, Any]:
    """A captioner.AttentionMap -> the record's compact "attention": the grid's [rows, cols],
    the caption's words, and per word its weight on each cell in whole percent, row-major."""
    return {"grid": list(attention.grid), "words": list(attention.words),
            "percent": [[round(100 * a) for a in step] for step in attention.weights]}


def error_record(path: str, stage: str, error: BaseException | str, message: str | None = None, *, run_id: str,
                 size: int | None = None, modified: float | None = None, sha256: str | None = None) -> dict[str, Any]:
    """Record for one input that produced no caption, and why."""
    if stage not in PREPARE_STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    name = error if isinstance(error, str) else type(error).__name__
    text = message if message is not None else (str(error) or name)
    return portable({"path": path, "stage": stage, "error": name, "message": text, "run_id": run_id,
                     "bytes": size, "modified": modified, "sha256": sha256})


class _EscapedRecord(dict):
    """A record holding text that is not valid UTF-8 (a path's undecodable bytes as
    surrogate escapes). Beam's default coder writes a plain dict's strings as UTF-8,
    which fails for those; it pickles this subclass instead."""


def portable(record: dict[str, Any]) -> dict[str, Any]:
    """`record`, as an _EscapedRecord when a top-level string cannot be UTF-8 encoded."""
    for value in record.values():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return _EscapedRecord(record)
    return record


def to_json_line(record: dict[str, Any]) -> str:
    """One JSON line. Text that is not valid UTF-8 (a path's undecodable bytes, held as
    surrogate escapes) is written as \\udcXX escapes, which json.loads gives back exactly
    (os.fsencode then yields the original bytes); everything else stays as it is."""
    line = json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, sort_keys=True, ensure_ascii=True, allow_nan=False)
    return line
