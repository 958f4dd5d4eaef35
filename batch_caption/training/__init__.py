"""Training of the captioner (either decoder) with tf.distribute (`python -m batch_caption.train`).

    config.py    TrainConfig: every training option, frozen and validated (no TensorFlow)
    preflight.py checks before TensorFlow: the dataset (DatasetSpec), flags vs dataset, OUTPUT
    strategy.py  the tf.distribute strategy from flags / TF_CONFIG, and this process's role
    input.py     tf.data: records -> (image | features, caption) pairs -> padded batches
    optim.py     learning-rate schedule, optimizers that do not re-aggregate, clipping
    loop.py      the custom loop: distributed step, checkpoints, eval, summaries, export
    stop.py      SIGTERM / SIGINT -> a stop flag every worker acts on after the same step
    samples.py   sample captions of validation images for TensorBoard
    result.py    TrainResult (OUTPUT/result.json) and the weights digest
    scene_encoder.py  CNN pretraining on synthetic scenes' facts (the offline stand-in for
                 ImageNet): `python -m batch_caption.training.scene_encoder`

Only `config.py`, `preflight.py` and `strategy.py` are imported before the strategy exists
(and they import no TensorFlow), so bad flags and a missing dataset are reported at once.
"""
