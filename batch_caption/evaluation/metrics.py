"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D with pycocoevalcap 1.2,
the code behind published COCO numbers.

* BLEU is corpus-level (clipped n-gram counts summed over all images, "closest"
  reference length for the brevity penalty), not a mean of sentence BLEUs.
* pycocoevalcap's ``Cider`` class *is* CIDEr-D: clipped n-gram tf-idf, a Gaussian length
  penalty (sigma = 6), averaged over 1-4 grams and references, times 10. Its idf comes
  from the references of the images being scored, so CIDEr-D depends on the evaluated
  set (and is always 0 for a single image).
* METEOR is the Java METEOR 1.5 jar (``-l en -norm``); ROUGE-L is LCS-based with beta 1.2.
* ``ptb`` tokenization runs the Stanford PTB tokenizer (Java) shipped with pycocoevalcap
  and drops punctuation tokens, as the COCO evaluation server does; ``none`` only splits
  on whitespace (captions are scored as given, case included).
* SPICE is deliberately absent: it downloads Stanford CoreNLP at run time.

Java is needed for METEOR and for the PTB tokenizer only: ``metrics=("bleu", "rouge",
"cider"), tokenizer="none"`` runs without it.
"""

from __future__ import annotations

import importlib.util
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
    "DEFAULT_TIMEOUT_S",
    "METRIC_NAMES",
    "METRIC_NOTES",
    "TOKENIZERS",
    "EvaluationError",
    "check_metrics",
    "needs_java",
    "require_java",
    "require_pycocoevalcap",
    "score_captions",
    "tokenize",
]

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
DEFAULT_TIMEOUT_S = 600.0


class EvaluationError(Exception):
    """An input or environment problem, reported as one line (CLI exit code 2)."""


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    """Metric group names -> the chosen groups, in report order. Raises ValueError."""
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
    return tokenizer == "ptb" or any(m in _JAVA_GROUPS for m in check_metrics(metrics))


def require_pycocoevalcap() -> None:
    """Every metric and the PTB tokenizer come from pycocoevalcap (about 100 MB with its
    Java jars), which the base install leaves to the `evaluate` extra."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise EvaluationError("the COCO metrics need pycocoevalcap, which is not installed: install the evaluate "
                              "extra (pip install -e '.[evaluate]' in a clone of batch_caption)")


def require_java(what: str) -> None:
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
    require_java("the PTB tokenizer")
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

    require_java("METEOR")
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
    groups = check_metrics(metrics)
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


# What each metric group's number means, for the report.
METRIC_NOTES: Mapping[str, str] = {
    "bleu": "BLEU-n: corpus-level (pycocoevalcap Bleu, 'closest' reference length)",
    "meteor": "METEOR: METEOR 1.5 jar, -l en -norm, corpus score",
    "cider": "CIDEr-D: pycocoevalcap Cider (clipped tf-idf n-grams, Gaussian length penalty "
    "sigma=6, x10); idf from the scored images' references",
}
