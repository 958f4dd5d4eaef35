#!/usr/bin/env bash
# Nightly incremental captioning of an image archive. Each night is one run,
# OUT/run=nightly-YYYYMMDD (UTC date), that captions only the images that are new or changed
# since the earlier complete runs under OUT (batch_caption.run --incremental); when it
# completes, OUT/LATEST names the newest complete run. A second run on the same day reuses
# the run id and so replaces that day's run (safe to retry after a failure).
#
#   ARCHIVE=/data/photos OUT=/data/captions jobs/nightly_archive.sh [batch_caption.run / Beam flags]
#   ARCHIVE=gs://bucket/photos OUT=gs://bucket/captions PROJECT=my-proj REGION=us-central1 \
#     jobs/nightly_archive.sh --max_num_workers 20      # on Dataflow, via jobs/dataflow_caption.py
#
# Environment: ARCHIVE (file, glob, directory or gs:// prefix) and OUT: required.
#   RUN_ID   default nightly-$(date -u +%Y%m%d)
#   PYTHON   interpreter with batch_caption installed (default: python on PATH)
#   PROJECT, REGION   set both to run on Dataflow (then ARCHIVE and OUT must be gs://, and
#            PYTHON's batch_caption needs the dataflow extra: pip install -e '.[dataflow]')
#   DRY_RUN=1   print the command instead of running it
# Without PROJECT it runs here on the in-memory DirectRunner: one process, whose read-ahead
# threads and TensorFlow use every core. A night is mostly listing and the catalog join,
# which worker processes would only pass back and forth (bench/archive_nightly.py). Extra
# arguments are appended, so e.g. --runner=FlinkRunner ... overrides that.
# Exit code: batch_caption.run's (0 complete, 2 bad flags / no input / the output's lock is
# held by another run, 1 pipeline failed, 3 more than --max_failed_fraction failed).
#
# cron (02:30 UTC nightly; a night whose previous run still holds OUT/_LOCK exits 2 and
# leaves that run alone; no '%' in the crontab line: the date is computed here):
#   30 2 * * * cd /srv/batch_caption && ARCHIVE=gs://bucket/photos OUT=gs://bucket/captions
#     PYTHON=/srv/batch_caption/.venv/bin/python
#     jobs/nightly_archive.sh >> /var/log/batch_caption-nightly.log 2>&1
#   (one line in the crontab; CRON_TZ=UTC if the machine's clock is not UTC)
set -euo pipefail
: "${ARCHIVE:?set ARCHIVE to the archive to caption}" "${OUT:?set OUT to the output directory}"
RUN_ID=${RUN_ID:-nightly-$(date -u +%Y%m%d)}
PYTHON=${PYTHON:-python}
JOBS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ -n "${PROJECT:-}" ]]; then
  : "${REGION:?set REGION too (PROJECT selects Dataflow)}"
  cmd=("$PYTHON" "$JOBS/dataflow_caption.py" --project "$PROJECT" --region "$REGION"
       --input "$ARCHIVE" --output "$OUT" --incremental --run_id "$RUN_ID" "$@")
  [[ "${DRY_RUN:-0}" == 1 ]] && cmd+=(--dry_run)
else
  cmd=("$PYTHON" -m batch_caption.run --input "$ARCHIVE" --output "$OUT" --incremental --run_id "$RUN_ID"
       --runner=DirectRunner "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
  fi
fi
[[ "${DRY_RUN:-0}" == 1 ]] || echo "$(date -u +%FT%TZ) nightly_archive: run $RUN_ID of $ARCHIVE into $OUT" >&2
exec "${cmd[@]}"
