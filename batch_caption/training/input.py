"""tf.data input: prepared records -> (image | features, caption) pairs -> padded batches.

    shard files            one record per image, in <split>-*.tfrecord
      -> shard             by input pipeline (file-wise if every pipeline gets a file,
                           else record-wise: never TF's FILE auto-sharding, which fails
                           with fewer files than workers)
      -> shuffle records   (serialized, so the buffer holds PNG bytes, not pixels)
      -> parse             {"image" uint8 [S, S, 3] | "features" float32 [F], "captions"}
      -> one pair per caption (unbatch), shuffled again so an image's captions spread
      -> tokens  [<start> w1 .. wn]  and  targets [w1 .. wn <end>]   (int32, L = n + 1)
      -> batch of per-replica size, padded with <pad> = 0
      -> prefetch

Batching: by default captions are bucketed by length (`bucket_width` tokens per bucket)
and each batch is padded to its own longest caption: the LSTM then runs over far fewer
pad steps than with padding to max_length, for at most max_length / bucket_width + 1
distinct shapes (the step function is traced once: the iterator's spec has a None time
dimension). `bucket_width=0` pads every batch to max_length + 1 instead: static shapes,
needed on TPU, and batch composition independent of the batch size (so runs with
different replica counts see exactly the same examples per step).

Every pipeline builds its own per-replica batches (`distribute_datasets_from_function`);
the training stream repeats forever, so no batch is ever partial.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from batch_caption.data.tfrecord import DatasetInfo, parse_example
from batch_caption.model import vocab as V

# Caption pairs held by the second shuffle (after expansion); a few batches' worth is
# enough to separate one image's captions.
_MIN_PAIR_BUFFER = 256


def input_key(info: DatasetInfo) -> str:
    """The model input a dataset feeds: "images" (uint8 pixels) or "features"."""
    return "images" if info.mode == "images" else "features"


def caption_to_tokens(caption):
    """int [n] word ids -> (tokens int32 [n + 1] = <start> w.., targets int32 [n + 1] = w.. <end>)."""
    caption = tf.cast(caption, tf.int32)
    tokens = tf.concat([[V.START_ID], caption], axis=0)
    targets = tf.concat([caption, [V.END_ID]], axis=0)
    return tokens, targets


def shard_records(files: Sequence[str], num_pipelines: int, pipeline_id: int, *, shuffle: bool, seed: int):
    """The serialized records of this input pipeline's shard; repeated forever if shuffling.

    With at least one file per pipeline, each pipeline reads its own files; otherwise all
    read every file in the same order and keep every num_pipelines-th record.
    """
    files = sorted(files)
    by_file = len(files) >= num_pipelines
    if by_file:
        files = files[pipeline_id::num_pipelines]
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        # Same seed on every pipeline: record-wise sharding needs one common order.
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 4),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if not by_file and num_pipelines > 1:
        ds = ds.shard(num_pipelines, pipeline_id)
    return ds


def expand_captions(records, info: DatasetInfo):
    """Serialized records -> one element per caption.

    Element: {"images" uint8 [S, S, 3] | "features" float32 [F],
              "tokens" int32 [L], "targets" int32 [L]} with L = caption length + 1.
    """
    key = input_key(info)

    def parse(serialized):
        ex = parse_example(serialized, info)
        captions = ex["captions"]
        n = captions.nrows()
        x = ex["image"] if key == "images" else ex["features"]
        # Dense [n, longest] + lengths: unbatching then yields plain tensors, not ragged.
        return {key: tf.repeat(x[None], n, axis=0), "caption": captions.to_tensor(), "length": captions.row_lengths()}

    def to_pair(e):
        tokens, targets = caption_to_tokens(e["caption"][: e["length"]])
        return {key: e[key], "tokens": tokens, "targets": targets}

    pairs = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    return pairs.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def bucket_boundaries(max_length: int, bucket_width: int) -> list[int]:
    """Boundaries of sequence length L = n + 1 in [1, max_length + 1]: buckets of `bucket_width`."""
    return list(range(bucket_width + 1, max_length + 2, bucket_width))


def batch_pairs(pairs, batch_size: int, max_length: int, bucket_width: int):
    """Pairs -> batches of `batch_size`, tokens/targets padded with <pad> (0).

    bucket_width > 0: length buckets, each batch padded to its longest caption.
    bucket_width = 0: every batch padded to max_length + 1 (static shapes).
    """
    if bucket_width == 0:
        shapes = {k: ([max_length + 1] if k in ("tokens", "targets") else s.shape) for k, s in pairs.element_spec.items()}
        return pairs.padded_batch(batch_size, padded_shapes=shapes, drop_remainder=True)
    boundaries = bucket_boundaries(max_length, bucket_width)
    return pairs.bucket_by_sequence_length(
        element_length_func=lambda e: tf.shape(e["tokens"])[0],
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
        drop_remainder=True,
    )


def make_dataset(
    files: Sequence[str],
    info: DatasetInfo,
    batch_size: int,
    *,
    num_pipelines: int = 1,
    pipeline_id: int = 0,
    training: bool = True,
    seed: int = 0,
    bucket_width: int = 4,
    shuffle_buffer: int = 1024,
):
    """The batches one input pipeline feeds to its replicas.

    Element: {"images" uint8 [B, S, S, 3] | "features" float32 [B, F],
              "tokens" int32 [B, T], "targets" int32 [B, T]}, B = batch_size (per replica).
    training: shuffle (seeded) and repeat forever; else the split in file order, repeated
      (evaluation takes a fixed number of batches from a fresh iterator).
    """
    records = shard_records(files, num_pipelines, pipeline_id, shuffle=training, seed=seed)
    if training:
        records = records.shuffle(shuffle_buffer, seed=seed + 1 + pipeline_id)
    else:
        records = records.repeat()
    pairs = expand_captions(records, info)
    if training:
        pairs = pairs.shuffle(max(_MIN_PAIR_BUFFER, 4 * batch_size), seed=seed + 7919 + pipeline_id)
    ds = batch_pairs(pairs, batch_size, info.max_length, bucket_width)
    options = tf.data.Options()
    options.deterministic = True
    # This function shards itself; TF must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def dataset_fn(files: Sequence[str], info: DatasetInfo, global_batch_size: int, **kwargs):
    """For `strategy.distribute_datasets_from_function`: input_context -> make_dataset(...)."""

    def fn(input_context: tf.distribute.InputContext):
        return make_dataset(
            files,
            info,
            input_context.get_per_replica_batch_size(global_batch_size),
            num_pipelines=input_context.num_input_pipelines,
            pipeline_id=input_context.input_pipeline_id,
            **kwargs,
        )

    return fn
