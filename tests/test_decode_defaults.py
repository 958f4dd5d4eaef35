"""A bundle's search defaults (decode.json): stored, verified, used by the job and the
API unless a flag overrides them; and the search's forbid_unknown option."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from helpers import varied_images
from PIL import Image

from batch_caption import api, cli, run
from batch_caption.model import bundle as B
from batch_caption.model import vocab as V
from batch_caption.model.captioner import Captioner
from batch_caption.model.config import DecodeConfig
from batch_caption.model.load import load_bundle, load_captioner
from batch_caption.training import decode_defaults

TUNED = DecodeConfig(beam_size=4, max_length=6, num_alternatives=2, length_normalization=1.0)


@pytest.fixture()
def tuned_bundle(tiny_bundle, tmp_path):
    path = str(tmp_path / "tuned")
    shutil.copytree(tiny_bundle, path)
    B.set_decode_defaults(path, TUNED)
    return path


def test_overridden_takes_the_given_settings_and_fits_the_n_best_to_the_beam():
    assert TUNED.overridden() == TUNED
    assert TUNED.overridden(length_normalization=0.0) == DecodeConfig(4, 6, 2, 0.0)
    assert TUNED.overridden(beam_size=1) == DecodeConfig(1, 6, 1, 1.0)
    assert DecodeConfig().overridden(beam_size=5) == DecodeConfig(beam_size=5, num_alternatives=3)
    with pytest.raises(ValueError, match="num_alternatives"):
        TUNED.overridden(num_alternatives=5)


def test_forbid_unknown_is_recorded_only_when_on():
    assert "forbid_unknown" not in DecodeConfig().to_dict()  # older records and catalogs keep matching
    on = DecodeConfig(forbid_unknown=True)
    assert on.to_dict()["forbid_unknown"] is True and DecodeConfig.from_dict(on.to_dict()) == on
    with pytest.raises(ValueError, match="unknown decode settings: beam"):
        DecodeConfig.from_dict({"beam": 3})


def test_decode_json_is_part_of_the_bundle_and_its_id(tiny_bundle, tuned_bundle):
    plain, tuned = load_bundle(tiny_bundle), load_bundle(tuned_bundle)
    assert plain.decode is None and tuned.decode == TUNED
    assert tuned.bundle_id != plain.bundle_id
    assert json.load(open(os.path.join(tuned_bundle, B.MANIFEST)))["files"][B.DECODE]
    assert load_captioner(tuned_bundle).decode == TUNED
    assert load_captioner(tuned_bundle, DecodeConfig()).decode == DecodeConfig()
    # Clearing gives back the bundle without defaults, and its id.
    assert B.set_decode_defaults(tuned_bundle, None) == plain.bundle_id
    assert not os.path.exists(os.path.join(tuned_bundle, B.DECODE))


def test_an_edited_or_missing_decode_json_is_refused_by_name(tuned_bundle):
    path = os.path.join(tuned_bundle, B.DECODE)
    with open(path, "w") as f:
        json.dump({**TUNED.to_dict(), "beam_size": 9}, f)
    with pytest.raises(B.BundleError, match="decode.json is corrupted or replaced"):
        B.verify_bundle(tuned_bundle)
    os.remove(path)
    with pytest.raises(B.BundleError, match="decode.json cannot be read"):
        load_bundle(tuned_bundle)


def test_the_job_searches_with_the_bundle_defaults_and_each_flag_overrides_one(tuned_bundle, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i, pixels in enumerate(varied_images(2, 64, seed=3)):
        Image.fromarray(pixels).save(root / f"{i}.png")

    def decodes(*flags):
        out = tmp_path / f"out{len(flags)}"
        run.run(["--input", str(root), "--output", str(out), "--model", tuned_bundle, "--run_id", "r", *flags])
        shard = next((out / "run=r").glob("captions-*.jsonl"))
        return {json.dumps(json.loads(line)["decode"], sort_keys=True) for line in open(shard)}

    assert decodes() == {json.dumps(TUNED.to_dict(), sort_keys=True)}
    assert decodes("--beam_size", "1", "--forbid_unknown") == {json.dumps(
        {"beam_size": 1, "max_length": 6, "num_alternatives": 1, "length_normalization": 1.0, "forbid_unknown": True},
        sort_keys=True)}
    with pytest.raises(run.UsageError, match="num_alternatives must be in \\[1, beam_size=4\\]"):
        run.run(["--input", str(root), "--output", str(tmp_path / "x"), "--model", tuned_bundle,
                 "--num_alternatives", "6"])


def _set_away_from_default(field: dataclasses.Field) -> tuple[list[str], object]:
    """The command-line words that set a DecodeConfig field to a valid value other than its
    default, and that value (every field at once stays valid: the n-best fits the beam)."""
    flag = "--" + cli.flag_names(DecodeConfig)[field.name]
    if isinstance(field.default, bool):
        return [flag if not field.default else f"--no-{flag[2:]}"], not field.default
    if isinstance(field.default, (int, float)):
        value = field.default + (1 if isinstance(field.default, int) else 0.25)
        return [flag, str(value)], value
    raise AssertionError(f"give a non-default value for DecodeConfig.{field.name} here")


def test_every_search_setting_is_a_flag_whose_value_reaches_the_search(tuned_bundle):
    """A DecodeConfig field is, with nothing more, a flag of the job (with its help) and of
    decode_defaults, whose value becomes the run's search setting over the bundle's."""
    argv, want = [], {}
    for field in dataclasses.fields(DecodeConfig):
        words, want[field.name] = _set_away_from_default(field)
        argv += words
    config, _ = run.parse(["--input", "x", "--model", tuned_bundle, *argv])
    assert config.search == want
    assert dataclasses.replace(config, model_decode=TUNED).decode == DecodeConfig(**want)
    assert config.options()[cli.flag_names(DecodeConfig)["max_length"]] == want["max_length"]
    helps = {a.option_strings[0]: a.help for a in run.build_parser()._actions if a.option_strings}
    for flag in cli.flag_names(DecodeConfig).values():
        assert helps[f"--{flag}"].endswith(")") and "(default: the model's, else " in helps[f"--{flag}"]
    args = decode_defaults.build_parser().parse_args(["--bundle", "b", *argv])
    assert DecodeConfig().with_flags(args) == DecodeConfig(**want)
    # Not given, a flag leaves the bundle's setting; the n-best still fits a smaller beam.
    config, _ = run.parse(["--input", "x", "--model", tuned_bundle, "--beam_size", "1"])
    assert dataclasses.replace(config, model_decode=TUNED).decode == TUNED.overridden(beam_size=1)


def test_the_api_uses_the_bundle_defaults_under_its_settings(tuned_bundle):
    assert api.load(tuned_bundle).model.decode == TUNED
    assert api.load(tuned_bundle, length_normalization=0.5).model.decode == TUNED.overridden(length_normalization=0.5)


def test_forbid_unknown_keeps_unk_out_of_every_hypothesis(tiny_model, tiny_vocab):
    """With <unk> the likeliest token everywhere, the search says it unless forbidden."""
    bias = tiny_model.output_projection.bias
    saved = bias.numpy()
    try:
        bias.assign(saved + np.eye(len(saved))[V.UNK_ID] * 50.0)
        images = varied_images(3, 64, seed=5)
        said = Captioner(tiny_model, tiny_vocab, DecodeConfig(max_length=5)).caption(images)
        assert all(V.UNK_ID in row[0].tokens for row in said)
        forbidden = Captioner(tiny_model, tiny_vocab, DecodeConfig(max_length=5, forbid_unknown=True)).caption(images)
        assert all(V.UNK_ID not in c.tokens for row in forbidden for c in row) and all(forbidden)
    finally:
        bias.assign(saved)


def test_the_decode_defaults_command(tiny_bundle, tmp_path, capsys):
    path = str(tmp_path / "b")
    shutil.copytree(tiny_bundle, path)
    assert decode_defaults.main(["--bundle", path, "--beam_size", "5", "--forbid_unknown"]) == 0
    assert load_bundle(path).decode == DecodeConfig(beam_size=5, forbid_unknown=True)
    assert decode_defaults.main(["--bundle", path, "--clear", "--beam_size", "2"]) == 2
    assert decode_defaults.main(["--bundle", path, "--beam_size", "0"]) == 2
    assert decode_defaults.main(["--bundle", str(tmp_path / "none"), "--beam_size", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "--clear takes no search settings" in err[0] and "beam_size must be in" in err[1]
    assert decode_defaults.main(["--bundle", path, "--clear"]) == 0
    assert load_bundle(path).decode is None
