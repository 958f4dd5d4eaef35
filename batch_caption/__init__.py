"""batch_caption: batch image captioning (Show and Tell) on Apache Beam."""

__version__ = "0.1.0"
