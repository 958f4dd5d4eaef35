#!/usr/bin/env bash
# Trains a candidate for the bundled scenes model (batch_caption/models/scenes/, `--model
# scenes`) with the decoder DECODER on synthetic scenes on this machine's CPUs, keeps it or
# the bundled scenes model, whichever scores higher on the validation split, and evaluates
# the kept one on held-out splits of two seeds with the captioning job + evaluate. The
# recipe of Show and Tell on real data, with a synthetic stand-in for ImageNet:
#   1. render the scenes (prepare --source synthetic, seed 0);
#   2. the CNN: the bundled scenes model's own (its decoders train on frozen features, so
#      every scenes model carries the CNN that was pretrained on the scenes' facts by
#      training.scene_encoder, pooled 3x3: one cell per place of the scenes' 3x3 layout);
#      PRETRAIN_ENCODER=1 pretrains it again instead (ENCODER_EPOCHS, 24,000 scenes);
#   3. precompute its features once (prepare --precompute_features), pooled the same way;
#   4. train the decoder named by DECODER on the frozen features (train), which exports
#      the bundle with the CNN: "attention" (Show, Attend and Tell over the 3x3 cells) or
#      "show_and_tell" (the image beside every word, --image_input every_step);
#   5. caption and score the validation split with the new bundle and with the bundled one,
#      and keep the one with the higher content accuracy there (test is never looked at);
#   6. caption and score test and compositional of seed 0 and of seed 1 (rendered here,
#      used for no choice) with the kept bundle.
#
#   bash jobs/train_scenes_model.sh [WORK_DIR]      (default: ./scenes_model_work)
#
# Writes WORK_DIR/{data,data_seed1,encoder,features,train,runs,eval}; copies the kept bundle
# to batch_caption/models/scenes/ and the reports beside it (EVALUATION.json), which name
# WORK_DIR's files relative to the checkout. Rerunning after an interruption skips the
# stages whose last-written file exists and resumes training from its last checkpoint.
# A new bundle needs its low_score threshold again: python bench/low_score.py --model scenes,
# then its value in batch_caption/bundled.py.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-scenes_model_work}
WORK=$(python -c 'import os, sys; print(os.path.relpath(sys.argv[1]))' "$WORK")
DECODER=${DECODER:-attention}
STEPS=${STEPS:-20000}
ENCODER_EPOCHS=${ENCODER_EPOCHS:-7}
IMAGE_SIZE=128
# The test, val and compositional scenes depend only on (seed, split, index), so the train
# count can grow without changing them.
COUNTS=train=60000,val=300,test=500,compositional=500
SEED1_COUNTS=train=1,test=1000,compositional=1000
BUNDLED=batch_caption/models/scenes

render() {  # render SEED COUNTS DIR: the scenes' images, captions and facts
  [ -e "$3/source/captions_test.json" ] || python -m batch_caption.prepare --source synthetic --seed "$1" \
    --synthetic_counts "$2" --image_size "$IMAGE_SIZE" --min_word_count 1 --output "$3"
}
render 0 "$COUNTS" "$WORK/data"
render 1 "$SEED1_COUNTS" "$WORK/data_seed1"

mkdir -p "$WORK/encoder"
if [ -e "$WORK/encoder/backbone.weights.h5" ]; then :
elif [ "${PRETRAIN_ENCODER:-0}" = 1 ]; then
  python -m batch_caption.training.scene_encoder --output "$WORK/encoder" --train_scenes 24000 --val_scenes 300 \
    --encoder small_cnn --small_cnn_grid 3 --image_size "$IMAGE_SIZE" --epochs "$ENCODER_EPOCHS" --seed 0
else
  python - "$BUNDLED" "$WORK/encoder" <<'PY'
import json, sys
from batch_caption.model.load import load_bundle
bundle, out = sys.argv[1:]
load_bundle(bundle).model.backbone.save_weights(f"{out}/backbone.weights.h5")
report = json.load(open(f"{bundle}/EVALUATION.json"))["encoder_pretraining"]
json.dump(report, open(f"{out}/report.json", "w"), indent=2, sort_keys=True)
PY
fi

splits=()
for split in train val test compositional; do splits+=(--split "$split=$WORK/data/source/captions_$split.json"); done
[ -e "$WORK/features/dataset.json" ] || python -m batch_caption.prepare --source coco "${splits[@]}" \
  --image_root "$WORK/data/source" \
  --precompute_features --encoder small_cnn --encoder_weights "$WORK/encoder/backbone.weights.h5" --small_cnn_grid 3 \
  --image_size "$IMAGE_SIZE" --min_word_count 1 --output "$WORK/features"

case "$DECODER" in
  attention) decoder_flags=(--decoder attention --attention_units 256 --embedding_size 256 --lstm_units 384) ;;
  show_and_tell) decoder_flags=(--image_input every_step --embedding_size 384 --lstm_units 384) ;;
  *) echo "DECODER must be attention or show_and_tell" >&2; exit 2 ;;
esac
bundle="$WORK/train/export"
[ -e "$bundle/bundle.json" ] || python -m batch_caption.train --data "$WORK/features" --output "$WORK/train" \
  "${decoder_flags[@]}" --dropout 0.2 \
  --global_batch_size 64 --steps "$STEPS" --learning_rate 2e-3 --lr_schedule cosine --warmup_steps 100 \
  --clip_norm 5 --checkpoint_every 2000 --eval_every 4000 --log_every 500 --seed 0

score() {  # score MODEL DATA SPLIT NAME: caption DATA's SPLIT with MODEL, evaluate it as NAME
  [ -e "$WORK/eval/$4.json" ] && return
  rm -rf "$WORK/runs/run=$4"
  python -m batch_caption.run --runner=DirectRunner --model "$1" \
    --input "$2/source/images/$3" --output "$WORK/runs" --run_id "$4"
  python -m batch_caption.evaluate --captions "$WORK/runs/run=$4" \
    --references "$2/source/captions_$3.json" --facts "$2/source/scenes_$3.json" --output "$WORK/eval/$4.json"
}
score "$bundle" "$WORK/data" val val-new
score "$BUNDLED" "$WORK/data" val val-bundled
kept=$(python - "$WORK" <<'PY'
import json, sys
acc = {n: json.load(open(f"{sys.argv[1]}/eval/val-{n}.json"))["content_accuracy"]["content_accuracy"] for n in ("new", "bundled")}
print("new" if acc["new"] > acc["bundled"] else "bundled")
PY
)
if [ "$kept" = new ]; then chosen=$bundle; else chosen=$BUNDLED; fi
[ -e "$WORK/kept/bundle.json" ] || { rm -rf "$WORK/kept"; cp -r "$chosen" "$WORK/kept"; }
for split in test compositional; do
  score "$WORK/kept" "$WORK/data" "$split" "$split"
  score "$WORK/kept" "$WORK/data_seed1" "$split" "$split-seed1"
done

rm -rf "$BUNDLED"
cp -r "$WORK/kept" "$BUNDLED"
python - "$WORK" "$kept" "$DECODER" <<'PY'
import json, sys
work, kept, decoder = sys.argv[1:]
load = lambda name: json.load(open(f"{work}/eval/{name}.json"))
report = {name: load(name) for name in ("test", "compositional", "test-seed1", "compositional-seed1")}
report["choice"] = {
    "rule": "the higher content accuracy on the validation split (seed 0, 300 scenes); test is not looked at",
    "validation_content_accuracy": {f"new ({decoder})": load("val-new")["content_accuracy"]["content_accuracy"],
                                    "bundled before": load("val-bundled")["content_accuracy"]["content_accuracy"]},
    "kept": f"new ({decoder})" if kept == "new" else "bundled before",
}
report["command"] = "bash jobs/train_scenes_model.sh"
report["encoder_pretraining"] = json.load(open(f"{work}/encoder/report.json"))
with open("batch_caption/models/scenes/EVALUATION.json", "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
PY
echo "scenes model: $(python -c 'import json; print(json.load(open("batch_caption/models/scenes/bundle.json"))["bundle_id"])') ($kept)"
