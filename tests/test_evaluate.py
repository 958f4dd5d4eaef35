"""batch_caption.evaluate: published pycocoevalcap values, matching, counts, facts, CLI errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from batch_caption import records
from batch_caption.evaluate import (
    EvaluationError,
    match_predictions,
    run,
    score_captions,
)

HAS_JAVA = shutil.which("java") is not None
FAST = ["--tokenizer", "none", "--metrics", "bleu,rouge,cider"]  # no JVM


def _record(path: str, caption: str) -> dict:
    """A caption record shaped like the job's (records.caption_record output)."""
    return {
        "path": path,
        "caption": caption,
        "score": -0.5,
        "logprob": -2.0,
        "alternatives": [{"caption": caption + " too", "score": -0.9, "logprob": -3.1}],
        "width": 64,
        "height": 64,
        "format": "PNG",
        "bytes": 1234,
        "sha256": "0" * 64,
        "model": "test-model",
        "run_id": "r1",
        "decode": {"beam_size": 3, "max_length": 20, "num_alternatives": 2, "length_normalization": 0.7},
    }


def _write_jsonl(path, pairs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(records.to_json_line(_record(p, c)) + "\n" for p, c in pairs), encoding="utf-8")
    return str(path)


def _write_references(path, images: dict[int, tuple[str, list[str]]]) -> str:
    coco = {
        "images": [{"id": i, "file_name": f, "width": 64, "height": 64} for i, (f, _) in images.items()],
        "annotations": [
            {"id": i * 10 + k, "image_id": i, "caption": c}
            for i, (_, caps) in images.items()
            for k, c in enumerate(caps)
        ],
    }
    path.write_text(json.dumps(coco), encoding="utf-8")
    return str(path)


def _strict_json(text: str):
    def no_constants(name):
        raise AssertionError(f"{name} in JSON report")

    return json.loads(text, parse_constant=no_constants)


# ----------------------------------------------------------------- published values


def test_scorers_on_strings_as_given():
    # pycocoevalcap's own test values: strings split on spaces, no tokenizer.
    scores = score_captions(
        {"img": "this is a good test"},
        {"img": ["this is a test", "this is also a test"]},
        tokenizer="none",
        metrics=["bleu", "rouge"],
    )
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"]
    assert scores["BLEU-1"] == pytest.approx(0.8, rel=1e-5)
    assert scores["BLEU-2"] == pytest.approx(0.632455, rel=1e-5)
    assert scores["BLEU-3"] == pytest.approx(0.5108729, rel=1e-5)
    assert scores["BLEU-4"] == pytest.approx(9.036e-5, rel=1e-3, abs=1e-7)
    assert scores["ROUGE-L"] == pytest.approx(0.9070631, rel=1e-5)


@pytest.mark.skipif(not HAS_JAVA, reason="PTB tokenizer and METEOR need java")
def test_cli_full_path_ptb_matches_published_values_and_runs_meteor(tmp_path, capsys):
    # The job's layout: absolute-ish paths whose tail is the COCO file_name.
    captions = _write_jsonl(
        tmp_path / "run=r1" / "captions-00000-of-00001.jsonl",
        [("gs://bucket/data/images/val/boy.jpg", "i am a boy"), ("gs://bucket/data/images/val/girl.jpg", "she is a girl")],
    )
    refs = _write_references(
        tmp_path / "captions_val.json",
        {1: ("images/val/boy.jpg", ["am i a boy ?"]), 2: ("images/val/girl.jpg", ["is she a girl ?"])},
    )
    out = tmp_path / "reports" / "report.json"
    report = run(["--captions", captions, "--references", refs, "--output", str(out)])

    m = report["metrics"]
    assert list(m) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]
    assert m["BLEU-2"] == pytest.approx(0.57735, rel=1e-5)
    assert m["ROUGE-L"] == pytest.approx(0.75, rel=1e-6)
    assert m["CIDEr-D"] == pytest.approx(3.3333, rel=1e-4)
    assert 0.0 < m["METEOR"] <= 1.0
    assert report["tokenizer"] == "ptb"
    assert report["counts"]["n_scored"] == 2
    assert _strict_json(out.read_text()) == json.loads(json.dumps(report))
    table = capsys.readouterr().out
    assert "CIDEr-D" in table and "METEOR" in table and "3.333333" in table


# ----------------------------------------------------------------- matching and counts


def test_match_by_path_suffix_then_unique_basename():
    file_names = {
        1: "images/test/a.png",
        2: "test/a.png",  # also a suffix of case 1's path: the longer suffix wins there
        3: "images/test/b.png",
        4: "images/val/c.png",
        5: "images/train/c.png",  # "c.png" is not unique: no basename fallback
    }
    m = match_predictions(
        [
            ("x/images/test/a.png", "one"),
            ("/other/test/a.png", "two"),  # suffix "test/a.png" -> 2
            ("gs://b/elsewhere/b.png", "three"),  # unique basename -> 3
            ("gs://b/elsewhere/c.png", "four"),  # ambiguous basename -> unmatched
            ("x/ximages/test/b.png", "five"),  # components, not characters: basename -> 3 again
            ("nothing.png", "six"),
        ],
        file_names,
    )
    assert m.predictions == {1: "one", 2: "two", 3: "three"}
    assert (m.n_records, m.n_unmatched, m.n_duplicates) == (6, 2, 1)


def test_missing_unmatched_and_duplicate_counts(tmp_path):
    refs = _write_references(
        tmp_path / "refs.json",
        {i: (f"images/test/{i}.png", [f"a red circle number {i}", "a red circle"]) for i in range(1, 6)},
    )
    captions = _write_jsonl(
        tmp_path / "captions.jsonl",
        [
            ("/in/images/test/1.png", "a red circle number 1"),
            ("/in/images/test/2.png", "a blue square"),
            ("/in/images/test/2.png", "a red circle number 2"),  # duplicate: first record wins
            ("/in/images/other/zzz.png", "a red circle"),  # unmatched
        ],
    )
    report = run(["--captions", captions, "--references", refs, *FAST])
    assert report["counts"] == {
        "n_images": 5,
        "n_records": 4,
        "n_predictions": 2,
        "n_missing": 3,
        "n_unmatched": 1,
        "n_duplicates": 1,
        "n_scored": 2,
    }
    # Scores cover the two predicted images only; image 2 keeps its first caption.
    alone = score_captions(
        {1: "a red circle number 1", 2: "a blue square"},
        {i: [f"a red circle number {i}", "a red circle"] for i in (1, 2)},
        tokenizer="none",
        metrics=["bleu", "rouge", "cider"],
    )
    assert report["metrics"] == pytest.approx(alone)
    assert "n_scored" in report["scope"]


def test_run_directory_input_reads_only_caption_shards(tmp_path):
    refs = _write_references(
        tmp_path / "refs.json",
        {1: ("images/test/a.png", ["a red circle"]), 2: ("images/test/b.png", ["a blue square"])},
    )
    run_dir = tmp_path / "out" / "run=abc"
    _write_jsonl(run_dir / "captions-00000-of-00002.jsonl", [("d/images/test/a.png", "a red circle")])
    _write_jsonl(run_dir / "captions-00001-of-00002.jsonl", [("d/images/test/b.png", "a blue square")])
    (run_dir / "errors-00000-of-00001.jsonl").write_text(
        records.to_json_line(records.error_record("d/images/test/c.png", "decode", "OSError", "bad", run_id="abc"))
        + "\n"
    )

    report = run(["--captions", str(run_dir) + "/", "--references", refs, *FAST])
    assert report["counts"]["n_records"] == 2 and report["counts"]["n_missing"] == 0
    assert len(report["inputs"]["caption_files"]) == 2
    assert report["metrics"]["BLEU-1"] == pytest.approx(1.0, rel=1e-6)
    assert "no manifest.json" in report["warnings"][0]

    (run_dir / "manifest.json").write_text("{}")
    again = run(["--captions", str(run_dir), "--references", refs, *FAST])  # no trailing slash
    assert "warnings" not in again and again["counts"] == report["counts"]


def test_gcs_run_directory_and_report_through_the_emulator(gcs_emulator, tmp_path):
    from google.cloud import storage

    bucket = storage.Client.create_anonymous_client().bucket(gcs_emulator)
    shard = records.to_json_line(_record("gs://photos/images/test/a.png", "a red circle")) + "\n"
    bucket.blob("out/run=g/captions-00000-of-00001.jsonl").upload_from_string(shard)
    bucket.blob("out/run=g/manifest.json").upload_from_string("{}")
    refs = _write_references(tmp_path / "refs.json", {1: ("images/test/a.png", ["a red circle", "a circle"])})
    bucket.blob("refs.json").upload_from_string(open(refs).read())

    root = f"gs://{gcs_emulator}"
    report = run(["--captions", f"{root}/out/run=g/", "--references", f"{root}/refs.json",
                  "--output", f"{root}/reports/eval.json", *FAST])  # fmt: skip
    assert report["counts"]["n_scored"] == 1 and "warnings" not in report
    assert report["inputs"]["caption_files"] == [f"{root}/out/run=g/captions-00000-of-00001.jsonl"]
    assert _strict_json(bucket.blob("reports/eval.json").download_as_text())["counts"] == report["counts"]


# ----------------------------------------------------------------- facts


def test_facts_give_content_accuracy_on_synthetic_scenes(tmp_path):
    from batch_caption.data.scenes import SceneConfig, write_dataset

    summary = write_dataset(tmp_path / "ds", {"test": 7}, seed=3, config=SceneConfig(image_size=64, supersample=1))
    split = summary["splits"]["test"]
    coco = json.loads(open(split["captions_file"]).read())
    first_ref = {a["image_id"]: a["caption"] for a in reversed(coco["annotations"])}
    images = coco["images"]
    # 4 true captions, 2 false ones (scenes hold <= 3 objects), 1 image left out.
    pairs = [(f"/mnt/ds/{img['file_name']}", first_ref[img["id"]]) for img in images[:4]]
    pairs += [(f"/mnt/ds/{img['file_name']}", "five white stars") for img in images[4:6]]
    captions = _write_jsonl(tmp_path / "captions.jsonl", pairs)

    report = run(
        ["--captions", captions, "--references", split["captions_file"], "--facts", split["scenes_file"], *FAST]
    )
    acc = report["content_accuracy"]
    assert acc["content_accuracy"] == 4 / 6
    assert (acc["n"], acc["n_correct"], acc["n_missing"], acc["n_without_facts"]) == (6, 4, 0, 0)
    assert report["counts"]["n_missing"] == 1 and report["counts"]["n_scored"] == 6
    # Inputs are named relative to the working directory, never by an absolute path.
    assert report["inputs"]["facts"] == os.path.relpath(split["scenes_file"])
    assert report["inputs"]["references"] == os.path.relpath(split["captions_file"])
    assert report["inputs"]["caption_files"] == report["inputs"]["captions"] == [os.path.relpath(captions)]


# ----------------------------------------------------------------- errors


def test_nothing_matches_exits_2_with_one_line(tmp_path, capsys):
    refs = _write_references(tmp_path / "refs.json", {1: ("images/test/a.png", ["a red circle"])})
    captions = _write_jsonl(tmp_path / "captions.jsonl", [("x/b.png", "a red circle")])
    with pytest.raises(SystemExit) as exc:
        run(["--captions", captions, "--references", refs, *FAST])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matched" in err


def test_no_java_exits_2_unless_java_free(tmp_path, monkeypatch, capsys):
    refs = _write_references(tmp_path / "refs.json", {1: ("a.png", ["a red circle"]), 2: ("b.png", ["a square"])})
    captions = _write_jsonl(tmp_path / "captions.jsonl", [("x/a.png", "a red circle"), ("x/b.png", "a square")])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for flags in ([], ["--tokenizer", "none"]):  # meteor (and ptb) need java
        with pytest.raises(SystemExit) as exc:
            run(["--captions", captions, "--references", refs, *flags])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "java" in err.lower()
    report = run(["--captions", captions, "--references", refs, *FAST])
    assert all(math.isfinite(v) for v in report["metrics"].values())
    with pytest.raises(EvaluationError, match="java"):
        score_captions({1: "a"}, {1: ["a"]}, tokenizer="ptb", metrics=["bleu"])


def test_bad_flags_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(["--captions", "x", "--references", "y", "--metrics", "bleu,spice"])
    assert exc.value.code == 2 and "spice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(["--captions", str(tmp_path / "nope-*.jsonl"), "--references", "y", *FAST])
    assert exc.value.code == 2 and "matches no caption file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(["--help"])
    assert exc.value.code == 0
    assert "--captions" in capsys.readouterr().out


def test_score_captions_edge_cases():
    with pytest.raises(ValueError, match="no reference"):
        score_captions({1: "a"}, {2: ["a"]}, tokenizer="none", metrics=["bleu"])
    with pytest.raises(ValueError, match="no predictions"):
        score_captions({}, {}, tokenizer="none", metrics=["bleu"])
    # Empty captions and token-less references stay finite (pycocoevalcap's Cider would raise).
    scores = score_captions({1: "", 2: "x"}, {1: [""], 2: [" "]}, tokenizer="none", metrics=["bleu", "rouge", "cider"])
    assert all(math.isfinite(v) for v in scores.values()) and scores["CIDEr-D"] == 0.0


def _child_pids() -> set[int]:
    pids: set[int] = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as fh:
            pids.update(int(p) for p in fh.read().split())
    return pids


@pytest.mark.skipif(not HAS_JAVA or not os.path.exists("/proc/self/task"), reason="needs java and Linux /proc")
def test_meteor_timeout_fails_cleanly_without_leaking_the_jvm():
    before = _child_pids()
    with pytest.raises(EvaluationError, match="METEOR did not finish"):
        score_captions({1: "a red circle"}, {1: ["a red circle"]}, tokenizer="none", metrics=["meteor"], timeout_s=0.3)
    assert _child_pids() <= before


def test_without_pycocoevalcap_the_command_names_the_extra_before_any_work(tmp_path):
    """A base install: importing pycocoevalcap fails (None in sys.modules makes it so)."""
    refs = _write_references(tmp_path / "refs.json", {1: ("a.png", ["a red circle"])})
    captions = _write_jsonl(tmp_path / "captions.jsonl", [("x/a.png", "a red circle")])
    out = tmp_path / "report.json"
    code = ("import runpy, sys; sys.modules['pycocoevalcap'] = None; "
            "runpy.run_module('batch_caption.evaluate', run_name='__main__')")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code, "--captions", captions, "--references", refs,
                           "--output", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": repo, "PATH": str(tmp_path / "no-java")})
    assert done.returncode == 2
    assert done.stderr == ("python -m batch_caption.evaluate: error: the COCO metrics need pycocoevalcap, which is "
                           "not installed: install the evaluate extra (pip install -e '.[evaluate]' in a clone of "
                           "batch_caption)\n")
    assert not out.exists()
