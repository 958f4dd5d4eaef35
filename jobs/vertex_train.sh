#!/usr/bin/env bash
# Recipe (not run in CI: needs a Google Cloud project): multi-worker GPU training on
# Vertex AI. Vertex sets TF_CONFIG with a "chief" task and "worker" tasks; train.py's
# --strategy multi_worker reads it (the chief writes checkpoints, TensorBoard and the
# bundle; other workers write to temp dirs). OUTPUT must be a gs:// path all tasks share.
#
#   PROJECT=my-proj REGION=us-central1 IMAGE=us-docker.pkg.dev/my-proj/bc/train:latest \
#   DATA=gs://my-bucket/data/coco OUTPUT=gs://my-bucket/train/coco bash jobs/vertex_train.sh
#
# IMAGE: a container with this package installed with the gpu extra
# (pip install ".[gpu]"); the same TF/Beam pins as requirements.txt.
set -euo pipefail
: "${PROJECT:?}" "${REGION:?}" "${IMAGE:?}" "${DATA:?}" "${OUTPUT:?}"
WORKERS=${WORKERS:-3}          # besides the chief
MACHINE=${MACHINE:-n1-standard-16}
GPU=${GPU:-NVIDIA_TESLA_V100}
GPUS=${GPUS:-4}

ARGS="--data=$DATA,--output=$OUTPUT,--strategy=multi_worker,--encoder=inception_v3,--encoder_weights=imagenet,\
--fine_tune_after_steps=200000,--global_batch_size=512,--steps=400000,\
--learning_rate=4e-3,--clip_norm=5,--checkpoint_every=2000,--eval_every=5000"
POOL="machine-type=$MACHINE,accelerator-type=$GPU,accelerator-count=$GPUS,container-image-uri=$IMAGE"

gcloud ai custom-jobs create --project="$PROJECT" --region="$REGION" --display-name=batch-caption-train \
  --worker-pool-spec="replica-count=1,$POOL" \
  --worker-pool-spec="replica-count=$WORKERS,$POOL" \
  --args="$ARGS" \
  --command=python,-m,batch_caption.train
