"""batch_caption: batch image captioning (CNN encoder, LSTM decoder, beam search) on Apache Beam."""

import time as _time

from batch_caption import quiet as _quiet

# When this process imported the package, about when it started: a command's start-up is
# measured from here (the model handler's first_caption_ms).
IMPORTED_AT = _time.time()

__version__ = "0.1.0"

_quiet.inherit()  # a worker process that a quiet command line started is quiet too
