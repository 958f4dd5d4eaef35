#!/usr/bin/env bash
# Caption images on this machine with every core: batch_caption.run on the DirectRunner in
# multi-process mode (--direct_num_workers=0 = one worker process per CPU core; each loads
# its own copy of the model: add --share_model for one copy per machine).
#
#   jobs/run_local.sh --input photos/ --output out/ [any batch_caption.run or Beam flag]
#   jobs/run_local.sh --direct_num_workers=4 --input photos/ --output out/   # later flags win
#
# With no --input it captions the model's bundled samples (into ./captions). PYTHON picks the
# interpreter (default: python on PATH, e.g. the activated virtualenv). The exit code is
# batch_caption.run's: 0 run complete (per-image failures are in errors-*.jsonl),
# 2 bad flags / missing model / input matching nothing, 1 the pipeline failed.
set -euo pipefail
exec "${PYTHON:-python}" -m batch_caption.run --runner=DirectRunner --direct_num_workers=0 \
  --direct_running_mode=multi_processing "$@"
