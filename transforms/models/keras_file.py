"""Keras 3 models as a :class:`RecurrentStack`: the ``.keras`` file format, and the
conversion of a Keras model's layers that the ``tf.train.Checkpoint`` format and
:mod:`transforms.export` share. Keras is imported only when a file is read (it costs
seconds).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from transforms.models.description import (DenseLayer, EmbeddingLayer, GRULayer, LSTMLayer,
                                           MaskingLayer, ModelError, ModelLoader,
                                           ModelOptions, RecurrentStack, SimpleRNNLayer,
                                           masks_inputs)

# Layers whose output at a step depends on later steps: a chunk's later steps have not
# arrived when it is computed.
_NON_CAUSAL = ("Bidirectional", "Attention", "AdditiveAttention", "MultiHeadAttention",
               "GroupedQueryAttention", "GlobalAveragePooling1D", "GlobalMaxPooling1D")
_IDENTITY_AT_INFERENCE = ("InputLayer", "Dropout", "GaussianNoise", "GaussianDropout")
_KERAS_SUPPORTED = ("stacked LSTM/GRU/SimpleRNN(return_sequences=True) layers, optionally "
                    "after one "
                    "Masking or Embedding layer and followed by Dense layers")


def stack_from_keras(model: Any, source: str) -> RecurrentStack:
    """A Keras 3 model (a chain of layers) as a :class:`RecurrentStack`, or a
    :class:`ModelError` naming the first layer that cannot run on chunks."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"{source}: the model must have one input and one output")
    input_layer, recurrent, head = None, [], []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "TimeDistributed" and type(layer.layer).__name__ == "Dense":
            layer, kind = layer.layer, "Dense"
        config = layer.get_config()
        if kind in _IDENTITY_AT_INFERENCE:
            continue
        if kind in ("Masking", "Embedding"):
            if input_layer or recurrent or head:
                raise ModelError(f"{source}: {kind} layer {layer.name!r} must be the "
                                 "model's first layer")
            input_layer = (MaskingLayer(float(config["mask_value"]), model.input_shape[-1])
                           if kind == "Masking" else
                           EmbeddingLayer(np.asarray(layer.embeddings), config["mask_zero"]))
        elif kind in ("LSTM", "GRU", "SimpleRNN"):
            if head:
                raise ModelError(f"{source}: {kind} layer {layer.name!r} after a Dense "
                                 "layer; dense layers are only supported as a per-step head")
            if not config["return_sequences"] or config["go_backwards"]:
                hint = ("" if config["go_backwards"] else
                        "; for a classifier (a last-step output), save the same layers "
                        "and weights with return_sequences=True: each chunk's output at "
                        "its last step is then what the classifier says there")
                raise ModelError(f"{source}: {kind} layer {layer.name!r} must have "
                                 f"return_sequences=True and go_backwards=False{hint}")
            if config.get("zero_output_for_mask") and masks_inputs(input_layer):
                raise ModelError(f"{source}: {kind} layer {layer.name!r} has "
                                 "zero_output_for_mask=True; with a mask only the Keras "
                                 "default (repeat the previous output) is supported")
            recurrent.append(_keras_recurrent(kind, layer, config))
        elif kind == "Dense":
            kernel, *bias = layer.get_weights()
            head.append(DenseLayer(
                kernel, bias[0] if bias else np.zeros(kernel.shape[1], np.float32),
                config["activation"]))
        elif kind in _NON_CAUSAL:
            raise ModelError(
                f"{source}: layer {layer.name!r} of type {kind} is not supported: it is not "
                "causal (its output at a step depends on later steps, which a chunked "
                f"run has not seen yet); a model must be {_KERAS_SUPPORTED}")
        else:
            raise ModelError(f"{source}: layer {layer.name!r} of type {kind} is not "
                             f"supported; a model must be {_KERAS_SUPPORTED}")
    return RecurrentStack(tuple(recurrent), tuple(head), source=source,
                          input_layer=input_layer)


def _keras_recurrent(kind: str, layer: Any, config: dict
                     ) -> LSTMLayer | GRULayer | SimpleRNNLayer:
    kernel, recurrent_kernel, *bias = layer.get_weights()
    if kind == "SimpleRNN":
        return SimpleRNNLayer(kernel, recurrent_kernel,
                              bias[0] if bias else np.zeros(kernel.shape[1], np.float32),
                              config["activation"])
    activations = (config["activation"], config["recurrent_activation"])
    if kind == "LSTM":
        return LSTMLayer(kernel, recurrent_kernel,
                         bias[0] if bias else np.zeros(kernel.shape[1], np.float32),
                         *activations)
    reset_after = bool(config["reset_after"])
    bias_shape = (2, kernel.shape[1]) if reset_after else (kernel.shape[1],)
    return GRULayer(kernel, recurrent_kernel,
                    bias[0] if bias else np.zeros(bias_shape, np.float32),
                    *activations, reset_after=reset_after)


class KerasLoader(ModelLoader):
    """Keras 3 ``.keras`` files (see :func:`stack_from_keras` for what they may hold)."""

    format_name = "keras"

    def can_load(self, path: str) -> bool:
        return path.endswith(".keras") and os.path.isfile(path)

    def load(self, path: str, options: ModelOptions) -> RecurrentStack:
        return stack_from_keras(read_keras(path), f"keras:{path}")


def read_keras(path: str) -> Any:
    """A ``.keras`` file, or a JSON config (``model.to_json()``) as an unweighted model."""
    import keras  # deferred: importing Keras costs seconds

    try:
        if path.endswith(".json"):
            with open(path) as handle:
                return keras.models.model_from_json(handle.read())
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelError(f"{path}: cannot be read as a Keras model: {error}") from error
