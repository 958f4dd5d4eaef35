"""Quality flags: cheap signs that a caption is probably wrong.

Each caption record carries `flags`, a sorted list of:
  unknown_word    the caption contains <unk> (the model met something outside its vocabulary)
  repeated_ngram  a word repeated back to back ("red red"), or any 2+-word phrase said
                  twice ("a circle and a circle"): the classic LSTM stutter
  low_score       the caption's score (logprob / length**alpha) is below the run's
                  --low_score_threshold (default -1.5: on average the model gave each
                  token less than ~e**-1.5 = 22% probability, length-normalised)
  truncated       the best caption reached --max_caption_length without an end token:
                  the sentence was cut off
"""

from __future__ import annotations

from batch_caption.model import vocab as V

LOW_SCORE, REPEATED_NGRAM, TRUNCATED, UNKNOWN_WORD = "low_score", "repeated_ngram", "truncated", "unknown_word"
FLAGS = (LOW_SCORE, REPEATED_NGRAM, TRUNCATED, UNKNOWN_WORD)
DEFAULT_LOW_SCORE = -1.5


def has_repeated_ngram(words: list[str]) -> bool:
    """True for an immediate word repeat or any n-gram (n >= 2) occurring twice."""
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    seen = set()
    for gram in zip(words, words[1:]):
        if gram in seen:
            return True
        seen.add(gram)
    return False


def caption_flags(caption: str, score: float, low_score_threshold: float = DEFAULT_LOW_SCORE,
                  truncated: bool = False) -> list[str]:
    """Sorted flags for one caption (see module docstring)."""
    # <unk> becomes one word token; punctuation is not a word.
    words = [w for w in V.tokenize(caption.replace(V.UNK, f" {_UNK_WORD} ")) if w[0].isalnum() or w[0] == "'"]
    flags = []
    if score < low_score_threshold:
        flags.append(LOW_SCORE)
    if has_repeated_ngram(words):
        flags.append(REPEATED_NGRAM)
    if truncated:
        flags.append(TRUNCATED)
    if _UNK_WORD in words:
        flags.append(UNKNOWN_WORD)
    return sorted(flags)


_UNK_WORD = "0unk0"  # cannot come out of the tokenizer as a real caption word next to letters
