"""batch_caption: batch image captioning (CNN encoder, LSTM decoder, beam search) on Apache Beam."""

from batch_caption import quiet as _quiet

__version__ = "0.1.0"

_quiet.inherit()  # a worker process that a quiet command line started is quiet too
