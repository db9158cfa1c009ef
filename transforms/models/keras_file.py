"""Keras 3 models as a :class:`RecurrentStack`: the ``.keras`` file format, and the
conversion of a Keras model's layers that the ``tf.train.Checkpoint`` format and
:mod:`transforms.export` share. Keras is imported only when a file is read (it costs
seconds).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from transforms.models.description import (ActivationLayer, BatchNormLayer, CausalConvLayer,
                                           DenseLayer, EmbeddingLayer, GRULayer, LayerNormLayer,
                                           LSTMLayer, MaskingLayer, MergeLayer, ModelError,
                                           ModelLoader, ModelOptions, RecurrentStack,
                                           SimpleRNNLayer, masks_inputs)

# Layers whose output at a step depends on later steps: a chunk's later steps have not
# arrived when it is computed.
_NON_CAUSAL = ("Bidirectional", "Attention", "AdditiveAttention", "MultiHeadAttention",
               "GroupedQueryAttention", "GlobalAveragePooling1D", "GlobalMaxPooling1D")
_IDENTITY_AT_INFERENCE = ("Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout",
                          "AlphaDropout", "ActivityRegularization")
_RECURRENT = ("LSTM", "GRU", "SimpleRNN")
# Activation layers that are one of the kernel's activations with these settings.
_ACTIVATION_LAYERS = {"ReLU": {"max_value": None, "negative_slope": 0.0, "threshold": 0.0},
                      "Softmax": {"axis": -1}, "ELU": {"alpha": 1.0}}
_MERGES = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply",
           "Average": "average", "Maximum": "maximum", "Minimum": "minimum",
           "Concatenate": "concatenate"}
_KERAS_SUPPORTED = ("causal layers computed step by step: LSTM/GRU/SimpleRNN "
                    "(go_backwards=False), Conv1D(padding='causal'), Dense, "
                    "LayerNormalization, BatchNormalization, Activation/ReLU/Softmax/ELU, "
                    "Dropout and the merges "
                    f"{'/'.join(_MERGES)}, after an optional Masking or Embedding input")


def keras_operations(model: Any) -> list[tuple[Any, list[Any], Any]]:
    """The operations computing a one-input, one-output Keras model (``Sequential`` or
    functional), in an order that computes each value before it is read:
    ``(layer, its input tensors, its output tensor)``, from the model's own graph (a
    layer called twice appears twice). Models used as layers are opened up: their
    inputs and outputs appear as ``(None, [tensor], same value)`` entries, aliases."""
    import keras  # deferred: importing Keras costs seconds

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError("the model must have one input and one output")
    done: set[int] = {id(model.inputs[0])}
    order: list[tuple[Any, list[Any], Any]] = []
    opened: set[int] = set()
    # (tensor, arguments computed?, the tensor it aliases or None)
    pending: list[tuple[Any, bool, Any]] = [(model.outputs[0], False, None)]
    while pending:  # a depth-first walk from the output, without recursion limits
        tensor, inputs_done, alias = pending.pop()
        if id(tensor) in done:
            continue
        if alias is not None:  # a nested model's input or output
            if inputs_done:
                done.add(id(tensor))
                order.append((None, [alias], tensor))
            else:
                pending += [(tensor, True, alias), (alias, False, None)]
            continue
        layer, node_index, tensor_index = tensor._keras_history
        node = layer._inbound_nodes[node_index]
        # The values a layer computes on; keyword tensors are masks Keras passes along.
        arguments = [t for t in keras.tree.flatten(node.arguments.args)
                     if isinstance(t, keras.KerasTensor)]
        if inputs_done:
            if tensor_index:
                raise ModelError(f"layer {layer.name!r} ({type(layer).__name__}): only a "
                                 "layer's first output can be used (not return_state)")
            if set(node.arguments.kwargs) - {"mask", "training"}:
                raise ModelError(f"layer {layer.name!r} ({type(layer).__name__}) is called "
                                 f"with {sorted(node.arguments.kwargs)}: only plain calls "
                                 "on the previous layers' outputs are supported")
            done.add(id(tensor))
            order.append((layer, arguments, tensor))
            continue
        if isinstance(layer, keras.Model):
            if id(layer) in opened or len(layer.inputs) != 1 or len(layer.outputs) != 1:
                raise ModelError(f"model {layer.name!r}, used as a layer, must have one "
                                 "input and one output and be called once")
            opened.add(id(layer))
            # Its output is its inner output; its inner input is what it is called on.
            pending += [(tensor, False, layer.outputs[0]),
                        (layer.inputs[0], False, arguments[0])]
            continue
        pending.append((tensor, True, None))
        # Reversed, so a merge's first input is computed first, as Keras orders them.
        pending += [(t, False, None) for t in reversed(arguments) if id(t) not in done]
    return order


def stack_from_keras(model: Any, source: str) -> RecurrentStack:
    """A Keras 3 model (``Sequential`` or functional, one input and one output) as a
    :class:`RecurrentStack`, or a :class:`ModelError` naming the first layer that
    cannot run on chunks."""
    try:
        operations = keras_operations(model)
    except ModelError as error:
        raise ModelError(f"{source}: {error}") from None
    model_input = model.inputs[0]
    # Each Keras tensor's value number (see RecurrentStack), and whether it still has a
    # time axis (False after a recurrent layer with return_sequences=False).
    values: dict[int, tuple[int, bool]] = {id(model_input): (0, True)}
    raw = {id(model_input)}  # the model's input, under every name it has
    input_layer, layers, inputs, raw_readers = None, [], [], []
    for layer, tensors, output in operations:
        reads = [values[id(tensor)] for tensor in tensors]
        if layer is None:  # a nested model's input or output: the same value
            values[id(output)] = reads[0]
            if id(tensors[0]) in raw:
                raw.add(id(output))
            continue
        kind = type(layer).__name__
        if kind == "TimeDistributed" and type(layer.layer).__name__ == "Dense":
            layer, kind = layer.layer, "Dense"
        if any(id(tensor) in raw for tensor in tensors) and kind not in (
                "Masking", "Embedding"):
            raw_readers.append(layer.name)
        if kind in _IDENTITY_AT_INFERENCE:
            values[id(output)] = reads[0]
            continue
        if kind in ("Masking", "Embedding"):
            if input_layer or id(tensors[0]) not in raw:
                raise ModelError(f"{source}: layer {layer.name!r} of type {kind} must be "
                                 "the model's first layer")
            config = layer.get_config()
            input_layer = (MaskingLayer(float(config["mask_value"]), model.input_shape[-1])
                           if kind == "Masking" else
                           EmbeddingLayer(np.asarray(layer.embeddings), config["mask_zero"]))
            values[id(output)] = (0, True)
            continue
        converted, sequence = _convert(layer, kind, [tuple(t.shape) for t in tensors],
                                       [sequence for _, sequence in reads], input_layer, source)
        layers.append(converted)
        inputs.append(tuple(value for value, _ in reads))
        values[id(output)] = (len(layers), sequence)
    if input_layer and raw_readers:
        raise ModelError(f"{source}: layer {raw_readers[0]!r} reads the model's input "
                         f"beside its {input_layer.kind} layer; only that layer may")
    output_value, sequence_output = values[id(model.outputs[0])]
    if not layers or output_value != len(layers):
        raise ModelError(f"{source}: no layer computes the model's output")
    return RecurrentStack(tuple(layers), tuple(inputs), source=source,
                          input_layer=input_layer, sequence_output=sequence_output)


def _convert(layer: Any, kind: str, shapes: list[tuple], sequences: list[bool],
             input_layer: Any, source: str) -> tuple[Any, bool]:
    """One Keras layer in seqcarry's layout, given the shapes of the values this call
    of it reads (a layer called twice has no single ``layer.input``), and whether its
    output has a time axis."""
    config = layer.get_config()
    name = f"{source}: layer {layer.name!r} of type {kind}"
    if kind in _RECURRENT + ("Conv1D",) and not sequences[0]:
        raise ModelError(f"{name} reads one vector per sequence, not a sequence")
    if kind in _MERGES and len(set(sequences)) > 1:
        raise ModelError(f"{name} merges per-step values with one-per-sequence ones "
                         "(the output of a return_sequences=False layer)")
    if kind in _RECURRENT:
        if config["go_backwards"]:
            raise ModelError(f"{name} must have go_backwards=False: it reads the sequence "
                             "from its end, which a chunked run has not seen yet")
        if config.get("zero_output_for_mask") and masks_inputs(input_layer):
            raise ModelError(f"{name} has zero_output_for_mask=True; with a mask only the "
                             "Keras default (repeat the previous output) is supported")
        return _keras_recurrent(kind, layer, config), bool(config["return_sequences"])
    if kind == "Conv1D":
        return _causal_conv(layer, config, name), True
    if kind == "Dense":
        kernel, *bias = layer.get_weights()
        return DenseLayer(kernel, bias[0] if bias else np.zeros(kernel.shape[1], np.float32),
                          config["activation"]), sequences[0]
    if kind == "LayerNormalization":
        _feature_axis(config["axis"], len(shapes[0]), name)
        width = int(shapes[0][-1])
        weights = list(layer.get_weights())
        gamma = weights.pop(0) if config["scale"] else np.ones(width, np.float32)
        beta = (weights.pop(0) if config["center"] and not config.get("rms_scaling")
                else np.zeros(width, np.float32))
        return LayerNormLayer(gamma, beta, float(config["epsilon"]),
                              bool(config.get("rms_scaling"))), sequences[0]
    if kind == "BatchNormalization":
        _feature_axis(config["axis"], len(shapes[0]), name)
        width = int(shapes[0][-1])
        weights = list(layer.get_weights())
        gamma = weights.pop(0) if config["scale"] else np.ones(width, np.float32)
        beta = weights.pop(0) if config["center"] else np.zeros(width, np.float32)
        mean, variance = weights
        return BatchNormLayer(mean, variance, gamma, beta, float(config["epsilon"])
                              ), sequences[0]
    if kind == "Activation" or _ACTIVATION_LAYERS.get(kind) == {
            key: config.get(key) for key in _ACTIVATION_LAYERS.get(kind, ())}:
        activation = config["activation"] if kind == "Activation" else kind.lower()
        return ActivationLayer(activation, int(shapes[0][-1])), sequences[0]
    if kind in _MERGES:
        if kind == "Concatenate" and config["axis"] not in (-1, len(shapes[0]) - 1):
            raise ModelError(f"{name} concatenates on axis {config['axis']}; only the "
                             "feature axis (-1) is computed step by step")
        return MergeLayer(_MERGES[kind], tuple(int(shape[-1]) for shape in shapes)
                          ), sequences[0]
    if kind in _NON_CAUSAL:
        raise ModelError(f"{name} is not supported: it is not causal (its output at a step "
                         "depends on later steps, which a chunked run has not seen yet). "
                         "Train a causal model instead (forward recurrent layers, "
                         "Conv1D(padding='causal')), or run whole sequences at once "
                         f"without seqcarry; a model must be made of {_KERAS_SUPPORTED}")
    raise ModelError(f"{name} is not supported; a model must be made of {_KERAS_SUPPORTED}")


def _feature_axis(axis: int | list[int], rank: int, name: str) -> None:
    """Refuse a normalization over another axis than the features (time, or several)."""
    if (axis if isinstance(axis, int) else tuple(axis)) not in (-1, rank - 1, (-1,),
                                                                 (rank - 1,)):
        raise ModelError(f"{name} normalizes over axis {axis}; only the feature axis "
                         "(-1) is computed step by step")


def _causal_conv(layer: Any, config: dict, name: str) -> CausalConvLayer:
    kernel, *bias = layer.get_weights()
    (dilation,), (stride,) = config["dilation_rate"], config["strides"]
    if config["padding"] != "causal" and kernel.shape[0] > 1:
        raise ModelError(f"{name} has padding={config['padding']!r}: its output at a step "
                         "reads later steps (or shortens the sequence); only "
                         "padding='causal' runs on chunks")
    if stride != 1 or config.get("groups", 1) != 1 or config.get(
            "data_format", "channels_last") != "channels_last":
        raise ModelError(f"{name} must have strides=1, groups=1 and channels_last data: "
                         "one output per input step")
    return CausalConvLayer(kernel, bias[0] if bias else np.zeros(kernel.shape[2], np.float32),
                           int(dilation), config["activation"])


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
