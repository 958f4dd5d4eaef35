#!/usr/bin/env bash
# Recipe (not run in CI: needs COCO 2014 and ImageNet weights, i.e. network): Show and Tell
# on MS-COCO with the Karpathy split, InceptionV3 pretrained on ImageNet, frozen then
# fine-tuned, on one machine (add --strategy mirrored for all its GPUs).
#
#   COCO=/data/coco KARPATHY=/data/dataset_coco.json OUT=/data/bc bash jobs/train_coco.sh
#
# COCO holds train2014/ and val2014/; KARPATHY is dataset_coco.json from Karpathy's
# neuraltalk2 release (113,287 train incl. restval / 5,000 val / 5,000 test images).
# What to expect on the test split (BLEU-4 / CIDEr-D): Show and Tell paper 27.7 BLEU-4;
# NIC re-implementations 26.2 / 79.0 with the CNN frozen, 30.0 / 94.7 fine-tuned.
set -euo pipefail
: "${COCO:?set COCO}" "${KARPATHY:?set KARPATHY}" "${OUT:?set OUT}"
SIZE=299

# 1. Dataset: decoded 299x299 images (fine-tuning needs pixels), vocabulary of words seen >= 4 times.
python -m batch_caption.prepare --source karpathy --captions "$KARPATHY" --image_root "$COCO" \
  --image_size "$SIZE" --min_word_count 4 --max_length 20 --output "$OUT/data" \
  --direct_num_workers=0 --direct_running_mode=multi_processing

# 2. Stage 1: the decoder on a frozen CNN; stage 2 (after 500k steps): the CNN too, at 0.1x lr.
python -m batch_caption.train --data "$OUT/data" --output "$OUT/train" \
  --encoder inception_v3 --encoder_weights imagenet --fine_tune_after_steps 500000 \
  --encoder_lr_multiplier 0.1 --embedding_size 512 --lstm_units 512 --dropout 0.3 \
  --global_batch_size 64 --steps 1000000 --learning_rate 2e-3 --lr_schedule exponential \
  --clip_norm 5 --checkpoint_every 5000 --eval_every 10000

# 3. Caption the test split with the job and score it.
python -m batch_caption.run --input_list <(python - "$OUT/data/references_test.json" <<'PY'
import json, sys
for im in json.load(open(sys.argv[1]))["images"]:
    print(im["file_name"])
PY
) --model "$OUT/train/export" --output "$OUT/runs" --run_id test
python -m batch_caption.evaluate --captions "$OUT/runs/run=test" --references "$OUT/data/references_test.json" \
  --output "$OUT/eval_test.json"
