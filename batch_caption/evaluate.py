"""`python -m batch_caption.evaluate`: score a run's captions against COCO references.

    python -m batch_caption.evaluate --captions out/run=<id>/ --references captions_test.json \
        [--facts scenes_test.json] [--output report.json] [--tokenizer ptb|none] [--metrics ...]

Reads the job's caption records (``captions-*.jsonl``, see :mod:`batch_caption.records`),
matches each record's ``path`` to a reference image, and reports the COCO caption metrics
BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (pycocoevalcap) - plus, with ``--facts``, the
synthetic-scene fact checker's content accuracy (:mod:`batch_caption.data.facts`).

Matching: a record matches the reference image whose ``file_name`` is a suffix of its
``path`` on "/"-separated components ("x/images/test/a.png" matches "images/test/a.png";
the longest such suffix wins), else the image with the same basename when that basename
is unique among the references. Every score is computed over the reference images that
have a prediction: a missing image is counted (``n_missing``), not scored as zero.

Metric notes (pycocoevalcap 1.2, the code behind published COCO numbers):

* BLEU is corpus-level (clipped n-gram counts summed over all images, "closest"
  reference length for the brevity penalty), not a mean of sentence BLEUs.
* pycocoevalcap's ``Cider`` class *is* CIDEr-D: clipped n-gram tf-idf, a Gaussian length
  penalty (sigma = 6), averaged over 1-4 grams and references, times 10. Its idf comes
  from the references of the images being scored, so CIDEr-D depends on the evaluated
  set (and is always 0 for a single image).
* METEOR is the Java METEOR 1.5 jar (``-l en -norm``); ROUGE-L is LCS-based with beta 1.2.
* ``--tokenizer ptb`` runs the Stanford PTB tokenizer (Java) shipped with pycocoevalcap
  and drops punctuation tokens, as the COCO evaluation server does; ``none`` only splits
  on whitespace (captions are scored as given, case included).
* SPICE is deliberately absent: it downloads Stanford CoreNLP at run time.

Java is needed for METEOR and for the PTB tokenizer; ``--metrics bleu,rouge,cider
--tokenizer none`` runs without it (what the trainer's periodic validation uses via
:func:`score_captions`).

Exit codes: 0 scored; 2 bad flags or inputs (nothing matched, no Java, unreadable
files), with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "ALL_METRICS",
    "METRIC_NAMES",
    "TOKENIZERS",
    "EvaluationError",
    "EvalOptions",
    "Matching",
    "build_parser",
    "evaluate",
    "format_table",
    "main",
    "match_predictions",
    "needs_java",
    "read_caption_records",
    "read_references",
    "resolve_caption_files",
    "run",
    "score_captions",
    "tokenize",
]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

# Metric groups (--metrics values) -> the report keys they produce, in report order.
_GROUPS: Mapping[str, tuple[str, ...]] = {
    "bleu": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE-L",),
    "cider": ("CIDEr-D",),
}
ALL_METRICS: tuple[str, ...] = tuple(_GROUPS)
METRIC_NAMES: tuple[str, ...] = tuple(name for group in _GROUPS.values() for name in group)
TOKENIZERS: tuple[str, ...] = ("ptb", "none")
_JAVA_GROUPS = frozenset({"meteor"})
_GLOB_CHARS = frozenset("*?[")
_CAPTIONS_PATTERN = "captions-*.jsonl"
_MANIFEST = "manifest.json"
DEFAULT_TIMEOUT_S = 600.0


class EvaluationError(Exception):
    """An input or environment problem, reported as one line (CLI exit code 2)."""


# --------------------------------------------------------------------------- scoring


def _check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(str(m).strip().lower() for m in metrics if str(m).strip()))
    unknown = [m for m in chosen if m not in _GROUPS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
    if not chosen:
        raise ValueError(f"no metric chosen; choose from {', '.join(ALL_METRICS)}")
    # Report order is fixed, whatever order they were asked in.
    return tuple(m for m in ALL_METRICS if m in chosen)


def needs_java(tokenizer: str, metrics: Iterable[str]) -> bool:
    """Whether scoring with these settings starts a JVM (PTB tokenizer or METEOR)."""
    return tokenizer == "ptb" or any(m in _JAVA_GROUPS for m in _check_metrics(metrics))


def _require_java(what: str) -> None:
    if shutil.which("java") is None:
        raise EvaluationError(
            f"{what} needs Java, but 'java' is not on PATH: install a JRE, or use "
            "--tokenizer none and --metrics without meteor"
        )


def _ptb_tokenize(sentences: Sequence[str], timeout_s: float) -> list[str]:
    """pycocoevalcap's PTB tokenization of each sentence, in one JVM run.

    Same jar, flags and punctuation filter as ``PTBTokenizer.tokenize``, but run here
    because that class writes its temp file into site-packages (fails on read-only
    installs), ignores Java's exit status and pairs output lines with captions by
    ``zip`` (a stray line separator silently shifts every later caption).
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    punctuation = frozenset(ptb.PUNCTUATIONS)
    # One caption a line, each newline-terminated (then Java emits exactly one line each).
    lines = [" ".join(str(s).split()) for s in sentences]
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(line + "\n" for line in lines)
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "UTF-8", path]  # fmt: skip
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise EvaluationError(f"PTB tokenizer did not finish within {timeout_s:g} s") from None
        except OSError as e:
            raise EvaluationError(f"could not start the PTB tokenizer (java): {e}") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        raise EvaluationError(f"PTB tokenizer failed (exit {proc.returncode}): {tail[0]}")
    out = proc.stdout.decode("utf-8").split("\n")
    if out and out[-1] == "":
        out.pop()
    if len(out) != len(lines):
        raise EvaluationError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    return [" ".join(w for w in line.rstrip("\r").split(" ") if w and w not in punctuation) for line in out]


def tokenize(
    captions: Mapping[K, Sequence[str]], tokenizer: str = "ptb", *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[K, list[str]]:
    """``{key: [caption, ...]}`` -> the same with each caption tokenized, space-joined.

    ``ptb``: Stanford PTB tokenizer (lower-cases, splits punctuation, then drops it);
    ``none``: whitespace split only.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "none":
        return {k: [" ".join(str(c).split()) for c in v] for k, v in captions.items()}
    _require_java("the PTB tokenizer")
    flat = [c for v in captions.values() for c in v]
    tokens = iter(_ptb_tokenize(flat, timeout_s))
    return {k: [next(tokens) for _ in v] for k, v in captions.items()}


def _meteor_text(text: str) -> str:
    # "|||" separates fields and a newline ends a request in METEOR's stdio protocol;
    # pycocoevalcap only strips "|||" from the hypothesis, not from references.
    return " ".join(text.replace("|||", " ").split())


def _close_meteor(meteor: Any) -> None:
    """Stop pycocoevalcap's METEOR JVM for good.

    ``Meteor`` has no close(): only ``__del__``, which takes ``meteor.lock`` - a lock
    ``compute_score`` leaves held when it raises, so that ``__del__`` would then block
    garbage collection forever. Kill the process here and hand it a fresh lock, which
    makes its later ``__del__`` a harmless no-op.
    """
    proc = getattr(meteor, "meteor_p", None)
    if proc is not None:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:  # e.g. BrokenPipeError flushing to a dead JVM
                pass
        proc.kill()
        proc.wait()
    meteor.lock = threading.Lock()


def _meteor_score(gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]], timeout_s: float) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    _require_java("METEOR")
    gts = {k: [_meteor_text(c) for c in v] for k, v in gts.items()}
    res = {k: [_meteor_text(c) for c in v] for k, v in res.items()}
    try:
        meteor = Meteor()
    except OSError as e:
        raise EvaluationError(f"could not start METEOR (java): {e}") from None
    # The protocol blocks on readline: a wedged JVM would hang us forever, so a
    # watchdog kills it, readline then sees EOF and the error below reports it.
    expired = threading.Event()

    def _expire() -> None:
        expired.set()
        meteor.meteor_p.kill()

    watchdog = threading.Timer(timeout_s, _expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as e:  # float('') on EOF, or a broken pipe
        if expired.is_set():
            raise EvaluationError(f"METEOR did not finish within {timeout_s:g} s") from None
        raise EvaluationError(f"METEOR (java) failed: {type(e).__name__}: {e}") from None
    finally:
        watchdog.cancel()
        _close_meteor(meteor)
    return float(score)


def score_captions(
    predictions: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    tokenizer: str = "ptb",
    metrics: Iterable[str] = ALL_METRICS,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, float]:
    """Corpus scores of ``predictions`` (image id -> caption) against ``references``.

    Scores cover exactly the predicted images; each needs at least one reference
    (references of other images are ignored). ``metrics`` picks groups from
    :data:`ALL_METRICS`; the result maps report names (``"BLEU-1"``..``"BLEU-4"``,
    ``"METEOR"``, ``"ROUGE-L"``, ``"CIDEr-D"``) to finite floats, in that order.
    Java is only started for METEOR or ``tokenizer="ptb"``.

    Raises ValueError for bad arguments, :class:`EvaluationError` when Java is
    missing or fails.
    """
    groups = _check_metrics(metrics)
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if not predictions:
        raise ValueError("no predictions to score")
    without = [k for k in predictions if not references.get(k)]
    if without:
        raise ValueError(f"{len(without)} predicted image(s) have no reference caption, e.g. {without[0]!r}")
    if not all(isinstance(c, str) for c in predictions.values()):
        raise ValueError("predictions must map image id -> caption string")

    # Internal integer keys: pycocoevalcap needs identical key sets, and one tokenizer
    # run covers references and predictions alike.
    ids = list(predictions)
    joint: dict[tuple[str, int], list[str]] = {}
    for i, k in enumerate(ids):
        joint[("ref", i)] = [str(c) for c in references[k]]
        joint[("res", i)] = [predictions[k]]
    tokens = tokenize(joint, tokenizer, timeout_s=timeout_s)
    gts = {i: tokens[("ref", i)] for i in range(len(ids))}
    res = {i: tokens[("res", i)] for i in range(len(ids))}

    scores: dict[str, float] = {}
    if "bleu" in groups:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 prints to stdout
        scores.update(zip(_GROUPS["bleu"], (float(b) for b in bleu)))
    if "meteor" in groups:
        scores["METEOR"] = _meteor_score(gts, res, timeout_s)
    if "rouge" in groups:
        from pycocoevalcap.rouge.rouge import Rouge

        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in groups:
        from pycocoevalcap.cider.cider import Cider

        # Cider raises (max() of nothing) when no reference has a single token.
        has_ngrams = any(ref.split() for refs in gts.values() for ref in refs)
        scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0]) if has_ngrams else 0.0
    bad = [name for name, value in scores.items() if not math.isfinite(value)]
    if bad:
        raise EvaluationError(f"non-finite score for {', '.join(bad)}")
    return scores


# --------------------------------------------------------------------------- inputs


def _filesystems():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _is_local(path: str) -> bool:
    return _filesystems().get_scheme(path) in (None, "file")


def _match(pattern: str) -> list[str]:
    from apache_beam.io.filesystem import BeamIOError

    try:
        results = _filesystems().match([pattern])
    except BeamIOError as e:
        raise EvaluationError(f"cannot list {pattern}: {e}") from None
    return sorted(m.path for r in results for m in r.metadata_list)


def _open_text(path: str) -> io.TextIOWrapper:
    try:
        return io.TextIOWrapper(_filesystems().open(path), encoding="utf-8")
    except Exception as e:  # Beam filesystems raise their own error types
        raise EvaluationError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _read_json(path: str, what: str) -> Any:
    with _open_text(path) as fh:
        try:
            return json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvaluationError(f"{what} {path} is not valid JSON: {e}") from None


def resolve_caption_files(specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--captions`` values -> (caption files, warnings).

    A value is a glob, a caption file, or a run directory (its ``captions-*.jsonl``).
    """
    fs = _filesystems()
    files: list[str] = []
    warnings: list[str] = []
    for spec in specs:
        if _GLOB_CHARS & set(spec):
            found = _match(spec)
        elif not spec.endswith("/") and not (_is_local(spec) and os.path.isdir(spec)) and fs.exists(spec):
            found = [spec]
        else:  # a run directory; on object stores it need not "exist" as such
            run_dir = spec.rstrip("/") or spec
            found = _match(fs.join(run_dir, _CAPTIONS_PATTERN))
            if found and not fs.exists(fs.join(run_dir, _MANIFEST)):
                warnings.append(f"{run_dir} has no {_MANIFEST}: the run is incomplete or still running")
        if not found:
            raise EvaluationError(f"--captions {spec} matches no caption file")
        files += found
    return list(dict.fromkeys(files)), warnings


def read_caption_records(files: Iterable[str]) -> list[tuple[str, str]]:
    """(path, caption) of every caption record in ``files``, in file then line order."""
    out: list[tuple[str, str]] = []
    for path in files:
        with _open_text(path) as fh:
            for n, line in enumerate(fh, 1):
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
    """What to evaluate; see ``python -m batch_caption.evaluate --help``."""

    captions: tuple[str, ...]
    references: str
    facts: str | None = None
    output: str | None = None
    tokenizer: str = "ptb"
    metrics: tuple[str, ...] = ALL_METRICS
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.captions:
            raise ValueError("no --captions given")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "metrics", _check_metrics(self.metrics))
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
    from batch_caption import gcs

    gcs.configure_for_emulator()  # else the first gs:// access waits ~30 s for credentials
    if needs_java(options.tokenizer, options.metrics):
        _require_java("--tokenizer ptb" if options.tokenizer == "ptb" else "METEOR")
    files, warnings = resolve_caption_files(options.captions)
    file_names, references = read_references(options.references)
    matching = match_predictions(read_caption_records(files), file_names)
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
        "captions": list(options.captions),
        "caption_files": files,
        "references": options.references,
        "facts": options.facts,
        "metrics": list(options.metrics),
    }
    report["tokenizer"] = options.tokenizer
    report["metric_notes"] = {name: _NOTES[name] for name in options.metrics if name in _NOTES}
    if warnings:
        report["warnings"] = warnings
    if options.output:
        _write_report(options.output, report)
    return report


_NOTES: Mapping[str, str] = {
    "bleu": "BLEU-n: corpus-level (pycocoevalcap Bleu, 'closest' reference length)",
    "meteor": "METEOR: METEOR 1.5 jar, -l en -norm, corpus score",
    "cider": "CIDEr-D: pycocoevalcap Cider (clipped tf-idf n-grams, Gaussian length penalty "
    "sigma=6, x10); idf from the scored images' references",
}


def _write_report(path: str, report: Mapping[str, Any]) -> None:
    text = json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n"
    if _is_local(path):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
    try:
        with _filesystems().create(path) as fh:
            fh.write(text.encode("utf-8"))
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
    p = argparse.ArgumentParser(
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
    p.add_argument("--references", required=True, metavar="JSON",
                   help="COCO captions JSON: images[{id, file_name}], annotations[{image_id, caption}]")
    p.add_argument("--facts", default=None, metavar="JSON",
                   help="scenes_<split>.json from batch_caption.data.scenes: also report content accuracy")
    p.add_argument("--output", default=None, metavar="JSON", help="write the JSON report here (local or gs://)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="ptb",
                   help="ptb: Stanford PTB tokenizer, punctuation dropped (COCO standard, needs Java); "
                   "none: whitespace split (default ptb)")  # fmt: skip
    p.add_argument("--metrics", default=",".join(ALL_METRICS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default all; meteor needs Java)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"limit for each Java step (tokenizer, METEOR) (default {DEFAULT_TIMEOUT_S:g})")
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry: parse ``argv``, evaluate, print the table; returns the report.

    Errors exit via SystemExit(2) with a one-line message on stderr.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = EvalOptions(
            captions=tuple(args.captions),
            references=args.references,
            facts=args.facts,
            output=args.output,
            tokenizer=args.tokenizer,
            metrics=tuple(args.metrics.split(",")),
            timeout_s=args.timeout,
        )
    except ValueError as e:
        parser.error(str(e))
    try:
        report = evaluate(options)
    except EvaluationError as e:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    print(format_table(report))
    return report


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run()


if __name__ == "__main__":
    main()
