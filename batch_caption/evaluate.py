"""`python -m batch_caption.evaluate`: score a run's captions against COCO references.

    python -m batch_caption.evaluate --captions out/run=<id>/ --references captions_test.json \
        [--facts scenes_test.json] [--output report.json] [--tokenizer ptb|none] [--metrics ...]

Reads the job's caption records (``captions-*.jsonl``, see :mod:`batch_caption.records`),
matches each record's ``path`` to a reference image, and reports the COCO caption metrics
BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (:mod:`batch_caption.evaluation.metrics`) - plus, with
``--facts``, the synthetic-scene fact checker's content accuracy
(:mod:`batch_caption.data.facts`).

Matching: a record matches the reference image whose ``file_name`` is a suffix of its
``path`` on "/"-separated components ("x/images/test/a.png" matches "images/test/a.png";
the longest such suffix wins), else the image with the same basename when that basename
is unique among the references. Every score is computed over the reference images that
have a prediction: a missing image is counted (``n_missing``), not scored as zero.

The report names its inputs as given, local absolute paths made relative to the working
directory, so it never records the machine it ran on.

Exit codes: 0 scored; 2 bad flags or inputs (nothing matched, no Java, pycocoevalcap
not installed, no credentials for a gs:// path, unreadable files), with a one-line
reason on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from batch_caption import cli, quiet
from batch_caption.storage import files, gcs
from batch_caption.evaluation.metrics import (ALL_METRICS, DEFAULT_TIMEOUT_S, METRIC_NAMES, METRIC_NOTES, TOKENIZERS,
                                        EvaluationError, check_metrics, needs_java, require_java,
                                        require_pycocoevalcap, score_captions, tokenize)

__all__ = ["ALL_METRICS", "METRIC_NAMES", "TOKENIZERS", "EvaluationError", "EvalOptions", "Matching", "build_parser",
           "evaluate", "format_table", "main", "match_predictions", "needs_java", "read_caption_records",
           "read_references", "resolve_caption_files", "run", "score_captions", "tokenize"]

log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")
_CAPTIONS_PATTERN = "captions-*.jsonl"
_MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- inputs


def _match(pattern: str) -> list[str]:
    from apache_beam.io.filesystem import BeamIOError

    try:
        return sorted(files.matched(pattern))
    except BeamIOError as e:
        raise EvaluationError(f"cannot list {pattern}: {e}") from None


def _read_text(path: str) -> str:
    try:
        return files.read_text(path)
    except Exception as e:  # Beam filesystems raise their own error types
        raise EvaluationError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{what} {path} is not valid JSON: {e}") from None


def resolve_caption_files(specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--captions`` values -> (caption files, warnings).

    A value is a glob, a caption file, or a run directory (its ``captions-*.jsonl``).
    """
    found_files: list[str] = []
    warnings: list[str] = []
    for spec in specs:
        if _GLOB_CHARS & set(spec):
            found = _match(spec)
        elif not spec.endswith("/") and not (not files.is_remote(spec) and os.path.isdir(spec)) and files.exists(spec):
            found = [spec]
        else:  # a run directory; on object stores it need not "exist" as such
            run_dir = spec.rstrip("/") or spec
            found = _match(files.join(run_dir, _CAPTIONS_PATTERN))
            if found and not files.exists(files.join(run_dir, _MANIFEST)):
                warnings.append(f"{run_dir} has no {_MANIFEST}: the run is incomplete or still running")
        if not found:
            raise EvaluationError(f"--captions {spec} matches no caption file")
        found_files += found
    return list(dict.fromkeys(found_files)), warnings


def read_caption_records(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(path, caption) of every caption record in the files `paths`, in file then line order."""
    out: list[tuple[str, str]] = []
    for path in paths:
        for n, line in enumerate(_read_text(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{path}:{n}: not a JSON caption record ({e.msg})") from None
            if not (isinstance(record, dict) and isinstance(record.get("path"), str)
                    and isinstance(record.get("caption"), str)):  # fmt: skip
                raise EvaluationError(f"{path}:{n}: a caption record needs string 'path' and 'caption'")
            out.append((record["path"], record["caption"]))
    return out


def read_references(path: str) -> tuple[dict[int, str], dict[int, list[str]]]:
    """COCO captions JSON -> ({image id: file_name}, {image id: [caption, ...]}).

    Every image is listed in the second dict (possibly with no caption); annotations
    of images not in ``images`` are ignored.
    """
    data = _read_json(path, "--references")
    try:
        file_names = {int(img["id"]): str(img["file_name"]) for img in data["images"]}
        captions: dict[int, list[str]] = {k: [] for k in file_names}
        for ann in data["annotations"]:
            image_id = int(ann["image_id"])
            if image_id in captions:
                captions[image_id].append(str(ann["caption"]))
    except (KeyError, TypeError, ValueError) as e:
        raise EvaluationError(
            f"--references {path} is not COCO captions JSON (images[id, file_name], "
            f"annotations[image_id, caption]): {type(e).__name__}: {e}"
        ) from None
    if not file_names:
        raise EvaluationError(f"--references {path} lists no images")
    return file_names, captions


def _components(path: str) -> tuple[str, ...]:
    return tuple(c for c in path.replace("\\", "/").split("/") if c not in ("", "."))


@dataclasses.dataclass(frozen=True)
class Matching:
    """Result of :func:`match_predictions`."""

    predictions: dict[int, str]  # image id -> caption (first record wins)
    n_records: int
    n_unmatched: int
    n_duplicates: int


def match_predictions(records: Sequence[tuple[str, str]], file_names: Mapping[int, str]) -> Matching:
    """Assign each (path, caption) record to a reference image (see the module doc).

    A second record for an already-matched image is counted as a duplicate and
    ignored, so results do not depend on which shard a retried image landed in last.
    """
    by_suffix: dict[tuple[str, ...], int] = {}
    by_basename: dict[str, list[int]] = {}
    for image_id, file_name in file_names.items():
        parts = _components(file_name)
        if not parts:
            raise EvaluationError(f"reference image {image_id} has an empty file_name")
        if parts in by_suffix:
            raise EvaluationError(f"reference images {by_suffix[parts]} and {image_id} share file_name {file_name}")
        by_suffix[parts] = image_id
        by_basename.setdefault(parts[-1], []).append(image_id)
    longest = max(len(p) for p in by_suffix)
    predictions: dict[int, str] = {}
    unmatched = duplicates = 0
    for path, caption in records:
        parts = _components(path)
        image_id = next(
            (by_suffix[parts[-k:]] for k in range(min(longest, len(parts)), 0, -1) if parts[-k:] in by_suffix),
            None,
        )
        if image_id is None and parts and len(by_basename.get(parts[-1], ())) == 1:
            image_id = by_basename[parts[-1]][0]
        if image_id is None:
            unmatched += 1
        elif image_id in predictions:
            duplicates += 1
        else:
            predictions[image_id] = caption
    return Matching(predictions, len(records), unmatched, duplicates)


# --------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate. Each field made by `cli.option` is the command's flag of its name
    (timeout_s: --timeout), with its help; captions come from the repeatable --captions."""

    captions: tuple[str, ...]
    references: str = cli.option(metavar="JSON", help="COCO captions JSON: images[{id, file_name}], "
                                 "annotations[{image_id, caption}]")
    facts: str | None = cli.option(None, metavar="JSON", help="scenes_<split>.json from batch_caption.data.scenes: "
                                   "also report content accuracy")
    output: str | None = cli.option(None, metavar="JSON", help="write the JSON report here (local or gs://)")
    tokenizer: str = cli.option("ptb", choices=TOKENIZERS, help="ptb: Stanford PTB tokenizer, punctuation dropped "
                                "(COCO standard, needs Java); none: whitespace split")
    metrics: tuple[str, ...] = cli.option(
        ALL_METRICS, metavar="LIST", parse=lambda text: tuple(text.split(",")),
        help=f"comma-separated subset of {','.join(ALL_METRICS)}", default_help="default all; meteor needs Java")
    timeout_s: float = cli.option(DEFAULT_TIMEOUT_S, flag="timeout", metavar="SECONDS",
                                  help="limit for each Java step (tokenizer, METEOR)",
                                  default_help=f"default {DEFAULT_TIMEOUT_S:g}")

    def __post_init__(self) -> None:
        if not self.captions:
            raise ValueError("no --captions given")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "metrics", check_metrics(self.metrics))
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be > 0, got {self.timeout_s}")


def _content_accuracy(facts_path: str, scored: Mapping[int, str]) -> dict[str, Any]:
    from batch_caption.data.facts import content_accuracy

    facts = _read_json(facts_path, "--facts")
    if not isinstance(facts, dict):
        raise EvaluationError(f"--facts {facts_path}: expected a JSON object keyed by image id")
    # Same image set as the caption metrics: only scenes that have a prediction.
    subset = {str(k): facts[str(k)] for k in scored if str(k) in facts}
    if not subset:
        raise EvaluationError(f"--facts {facts_path} has no scene for any matched image (another split?)")
    result = content_accuracy({str(k): v for k, v in scored.items()}, subset)
    result["n_without_facts"] = len(scored) - len(subset)
    return result


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Run the evaluation described by ``options``; returns (and maybe writes) the report."""
    require_pycocoevalcap()
    if needs_java(options.tokenizer, options.metrics):
        require_java("--tokenizer ptb" if options.tokenizer == "ptb" else "METEOR")
    caption_files, warnings = resolve_caption_files(options.captions)
    file_names, references = read_references(options.references)
    matching = match_predictions(read_caption_records(caption_files), file_names)
    if not matching.predictions:
        raise EvaluationError(
            f"none of {matching.n_records} caption record(s) matched any of the {len(file_names)} "
            f"reference images (by file_name path suffix or unique basename)"
        )
    scored = {k: v for k, v in matching.predictions.items() if references[k]}
    if not scored:
        raise EvaluationError("no matched reference image has a reference caption")
    for message in warnings:
        log.warning("%s", message)

    report: dict[str, Any] = {
        "metrics": score_captions(
            scored, references, options.tokenizer, options.metrics, timeout_s=options.timeout_s
        )
    }
    if options.facts:
        report["content_accuracy"] = _content_accuracy(options.facts, scored)
    report["counts"] = {
        "n_images": len(file_names),
        "n_records": matching.n_records,
        "n_predictions": len(matching.predictions),
        "n_missing": len(file_names) - len(matching.predictions),
        "n_unmatched": matching.n_unmatched,
        "n_duplicates": matching.n_duplicates,
        "n_scored": len(scored),
    }
    report["scope"] = (
        "scores cover the n_scored reference images that have a prediction (and a reference "
        "caption); the n_missing images without one are not counted as zero"
    )
    report["inputs"] = {
        "captions": [_named(c) for c in options.captions],
        "caption_files": [_named(f) for f in caption_files],
        "references": _named(options.references),
        "facts": options.facts and _named(options.facts),
        "metrics": list(options.metrics),
    }
    report["tokenizer"] = options.tokenizer
    report["metric_notes"] = {name: METRIC_NOTES[name] for name in options.metrics if name in METRIC_NOTES}
    if warnings:
        report["warnings"] = warnings
    if options.output:
        _write_report(options.output, report)
    return report


def _named(path: str) -> str:
    """How the report names an input: URLs and relative paths as given, a local absolute
    path relative to the working directory (never a machine's absolute path)."""
    if files.is_remote(path) or not os.path.isabs(path):
        return path
    return os.path.relpath(path)


def _write_report(path: str, report: Mapping[str, Any]) -> None:
    text = json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n"
    try:
        files.write_text(path, text)
    except Exception as e:  # Beam filesystems raise their own error types
        raise EvaluationError(f"cannot write --output {path}: {type(e).__name__}: {e}") from None


def format_table(report: Mapping[str, Any]) -> str:
    """The CLI's stdout: one (metric, value) row each, then the image counts."""
    rows = list(report["metrics"].items())
    if "content_accuracy" in report:
        rows.append(("content accuracy", report["content_accuracy"]["content_accuracy"]))
    width = max(len("metric"), *(len(name) for name, _ in rows))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  --------"]
    lines += [f"{name:<{width}}  {value:.6f}" for name, value in rows]
    c = report["counts"]
    lines.append(
        f"({c['n_scored']} of {c['n_images']} reference images scored; {c['n_missing']} missing, "
        f"{c['n_unmatched']} unmatched and {c['n_duplicates']} duplicate records; "
        f"tokenizer {report['tokenizer']})"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m batch_caption.evaluate",
        description="Score caption records (captions-*.jsonl) against COCO-format reference captions: "
        "BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap), and optionally the synthetic-scene "
        "fact checker's content accuracy. Scores cover the reference images that have a prediction.",
        epilog="Records match the reference image whose file_name is a '/'-component suffix of their "
        "path (else a unique basename). Java is needed for METEOR and --tokenizer ptb. "
        "Exit codes: 0 scored, 2 bad flags or inputs (one-line reason on stderr).",
    )
    p.add_argument("--captions", action="append", required=True, metavar="PATH",
                   help="caption JSONL file, glob, or run directory .../run=<id>/ (reads its captions-*.jsonl); "
                   "local, gs:// or any Beam filesystem. Repeatable.")  # fmt: skip
    cli.add_flags(p, EvalOptions)
    quiet.add_verbose_flag(p)
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry: parse ``argv``, evaluate, print the table; returns the report.

    Errors exit via SystemExit(2) with a one-line message on stderr.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        options = cli.from_args(EvalOptions, args, captions=tuple(args.captions))
        gcs.require_credentials([*options.captions, options.references, options.facts, options.output])
    except ValueError as e:  # cli.UsageError (a bad flag) is one
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    try:
        report = evaluate(options)
    except EvaluationError as e:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    print(format_table(report))
    return report


def main() -> None:
    quiet.setup()  # this process's command line: quiet unless --verbose
    run()


if __name__ == "__main__":
    main()
