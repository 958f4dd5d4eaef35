"""Quality flags: cheap signs that a caption is probably wrong.

Each caption record carries `flags`, a sorted list of:
  low_score       the caption's score (logprob / length**alpha) is below the run's
                  --low_score_threshold (default: the model's own calibration, kept per
                  bundled model in batch_caption/bundled.py; for the scenes model the 1st
                  percentile of its scores on held-out scenes, bench/low_score.py: its
                  least confident captions, not those of images unlike training)
  repeated_ngram  the caption says something twice (see has_repeated_ngram): the LSTM
                  stutter, never ordinary enumeration
  truncated       the best caption reached --max_caption_length without an end token:
                  the sentence was cut off
  unknown_word    the caption contains <unk> (the model met something outside its vocabulary)
"""

from __future__ import annotations

from batch_caption.model import vocab as V

LOW_SCORE, REPEATED_NGRAM, TRUNCATED, UNKNOWN_WORD = "low_score", "repeated_ngram", "truncated", "unknown_word"
FLAGS = (LOW_SCORE, REPEATED_NGRAM, TRUNCATED, UNKNOWN_WORD)

# Words that relate or count the things a caption names rather than name them: articles,
# numbers, pronouns, prepositions (spatial relations included), conjunctions, auxiliaries.
# A phrase of them said twice ("to the left of ... to the left of") is grammar, not a stutter.
FUNCTION_WORDS = frozenset("""
    a an the this that these those some any each every another other its it they them their there here
    one two three four five six seven eight nine ten many several both all few no not
    and or but with without of in on at to from by for into onto over under above below beneath
    between among around near next beside behind across along through against off up down out
    left right top bottom front middle side inside outside
    is are was were be been being has have had do does while as than then who which where what
""".split())
_DEFINITE = "the"


def content_phrases(tokens: list[str]) -> list[tuple[bool, tuple[str, ...]]]:
    """(after "the", words) of each maximal run of content words in `tokens` (words not
    in FUNCTION_WORDS; punctuation ends a run): "a large red circle" -> "large red circle"."""
    phrases, run, definite = [], [], False
    for prev, tok in zip([""] + tokens, tokens):
        word = tok[0].isalnum() or tok[0] == "'"
        if word and tok not in FUNCTION_WORDS:
            if not run:
                definite = prev == _DEFINITE
            run.append(tok)
            continue
        if run:
            phrases.append((definite, tuple(run)))
        run = []
    if run:
        phrases.append((definite, tuple(run)))
    return phrases


def has_repeated_ngram(tokens: list[str]) -> bool:
    """True when the caption says something twice:
      * a word twice in a row ("red red", "circle circle", "a a"), or words said again
        right after themselves ("a red circle red circle");
      * the same content phrase twice ("a red circle and a red circle", "a circle on a
        circle"). A phrase after "the" refers back to one named before ("a blue square
        ... the blue square") and is compared only with other phrases after "the".
    Lists that share modifiers name different phrases and do not count ("a small red
    circle and a small red star", "a large red circle, a large white square and a large
    purple circle"), nor do repeated function words ("is to the left of ... is to the
    left of"). `tokens`: V.tokenize's words and punctuation."""
    words = [t for t in tokens if t[0].isalnum() or t[0] == "'"]
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    phrases = content_phrases(tokens)
    return len(set(phrases)) < len(phrases) or any(_says_twice(run) for _, run in phrases)


def _says_twice(run: tuple[str, ...]) -> bool:
    """True when a run of content words holds a part said again right after it ("red circle
    red circle"): back to back, the two copies join into one run."""
    return any(run[i : i + n] == run[i + n : i + 2 * n]
               for n in range(2, len(run) // 2 + 1) for i in range(len(run) - 2 * n + 1))


def caption_flags(caption: str, score: float, low_score_threshold: float,
                  truncated: bool = False) -> list[str]:
    """Sorted flags for one caption (see module docstring)."""
    # <unk> becomes one word token, so that it is one content word like any other.
    tokens = V.tokenize(caption.replace(V.UNK, f" {_UNK_WORD} "))
    flags = []
    if score < low_score_threshold:
        flags.append(LOW_SCORE)
    if has_repeated_ngram(tokens):
        flags.append(REPEATED_NGRAM)
    if truncated:
        flags.append(TRUNCATED)
    if _UNK_WORD in tokens:
        flags.append(UNKNOWN_WORD)
    return sorted(flags)


_UNK_WORD = "0unk0"  # cannot come out of the tokenizer as a real caption word next to letters
