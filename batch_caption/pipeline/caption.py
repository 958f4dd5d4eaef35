"""CaptionImages: ImageExamples -> caption records, through RunInference.

Inference failures come back from RunInference's dead-letter output, one failed batch at
a time (core/dead_letters.py); a caption the record contract refuses is an error record
(stage infer) of its own.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from batch_caption import records
from batch_caption.core.dead_letters import FailedBatchToErrorsFn, infer_error
from batch_caption.core.elements import ERRORS, counter
from batch_caption.core.inference import CaptionModelHandler
from batch_caption.model.config import DecodeConfig


class _ToCaptionRecordFn(beam.DoFn):
    """PredictionResult(example, n-best, model id) -> caption record."""

    def __init__(self, run_id: str, decode: DecodeConfig, low_score_threshold: float):
        self._run_id = run_id
        self._decode = decode.to_dict()
        self._threshold = low_score_threshold

    def setup(self):
        self._captioned = counter("captioned")
        self._failed = counter("failed_infer")

    def process(self, result):
        example = result.example
        for source in example.source_files():
            path, modified = source.path, source.modified
            try:
                record = records.caption_record(
                    example,
                    result.inference,
                    model_id=result.model_id,
                    run_id=self._run_id,
                    decode=self._decode,
                    low_score_threshold=self._threshold,
                    path=path,
                    modified=modified,
                )
            except ValueError as e:  # no caption, or a non-finite score: the model's failure
                self._failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, infer_error(example, source, e, None, self._run_id))
                continue
            self._captioned.inc()
            yield record


class CaptionImages(beam.PTransform):
    """PCollection[ImageExample] -> caption records; tag 'errors' for inference failures."""

    def __init__(
        self,
        handler: CaptionModelHandler,
        decode: DecodeConfig,
        run_id: str,
        low_score_threshold: float,
    ):
        super().__init__()
        self._handler = handler
        self._decode = decode
        self._run_id = run_id
        self._threshold = low_score_threshold

    def expand(self, examples):
        predictions, dead = examples | "RunInference" >> RunInference(self._handler).with_exception_handling()
        out = predictions | "ToCaptionRecords" >> beam.ParDo(
            _ToCaptionRecordFn(self._run_id, self._decode, self._threshold)
        ).with_outputs(ERRORS, main="captions")
        failed = dead.failed_inferences | "FailedBatchesToErrors" >> beam.ParDo(FailedBatchToErrorsFn(self._run_id))
        errors = (out[ERRORS], failed) | "FlattenInferErrors" >> beam.Flatten()
        return {"captions": out.captions, ERRORS: errors}
