"""Encoders (BERT, ERNIE 3.0), task heads, the multi-task model and span decoding."""
from toolkit.models.encoder import (ARCHS, EncoderSpec, build_encoder, check_vocab, count_parameters,
                                    encoder_layers, load_tokenizer, spec_from_model, uses_task_id)
from toolkit.models.heads import HEADS, TaskHead, build_head, register_head
from toolkit.models.span import SpanFeature, postprocess_span_predictions
from toolkit.models.task_model import (MultiTaskModel, TaskOutput, load_task_model, read_task_meta,
                                       save_task_model)

__all__ = [
    "ARCHS", "EncoderSpec", "build_encoder", "check_vocab", "count_parameters", "encoder_layers",
    "load_tokenizer", "spec_from_model", "uses_task_id", "HEADS", "TaskHead", "build_head",
    "register_head", "SpanFeature", "postprocess_span_predictions", "MultiTaskModel", "TaskOutput",
    "load_task_model", "read_task_meta", "save_task_model",
]
