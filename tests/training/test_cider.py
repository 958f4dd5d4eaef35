"""The CIDEr-D training reward agrees with pycocoevalcap's CIDEr-D (evaluate's metric)."""

import random

import pytest

from batch_caption.training.cider import CiderD, ngram_counts

cider = pytest.importorskip("pycocoevalcap.cider.cider")

WORDS = "a dog man woman runs sits on the grass in red shirt beach ball two children play water".split()


def _corpus(seed, images=12):
    rng = random.Random(seed)
    refs = {i: [[rng.choice(WORDS) for _ in range(rng.randint(3, 12))] for _ in range(rng.randint(1, 5))]
            for i in range(images)}
    hyps = {i: [rng.choice(WORDS) for _ in range(rng.randint(1, 14))] for i in range(images)}
    # One hypothesis equal to a reference, one sharing nothing with them.
    hyps[0] = list(refs[0][0])
    hyps[1] = ["zebra", "zebra"]
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocoevalcap_with_the_same_idf(seed):
    refs, hyps = _corpus(seed)
    expected = cider.Cider().compute_score({i: [" ".join(r) for r in rs] for i, rs in refs.items()},
                                           {i: [" ".join(h)] for i, h in hyps.items()})[1]
    scorer = CiderD(refs)
    got = [scorer.score(i, hyps[i]) for i in sorted(hyps)]
    assert got == pytest.approx(list(expected), rel=1e-9, abs=1e-12)
    assert got[1] == 0.0 and got[0] > max(got[2:])


def test_idf_comes_from_all_references_not_the_scored_image():
    refs = {0: [["a", "dog", "runs"]], 1: [["a", "cat", "sits"]], 2: [["a", "bird", "flies"]]}
    scorer = CiderD(refs)
    # "a" is in every image's references: zero idf, so it alone earns nothing.
    assert scorer.score(0, ["a"]) == 0.0
    assert scorer.score(0, ["dog"]) > 0.0
    assert scorer.score(0, ["a", "dog", "runs"]) > scorer.score(0, ["a", "dog", "sits"])


def test_ngram_counts():
    assert ngram_counts(["a", "b", "a"], 2) == {("a",): 2, ("b",): 1, ("a", "b"): 1, ("b", "a"): 1}


def test_no_references_is_refused():
    with pytest.raises(ValueError):
        CiderD({})
