"""Whole-sequence results computed by Keras itself: the oracle that the demo and the
tests compare the pipeline against. It shares no code with the kernel.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


def keras_with_state(model: Any) -> Any:
    """A twin of a Keras model of seqcarry's kind (see
    :func:`transforms.models.keras_file.stack_from_keras`) that starts from given states
    and returns its final ones.

    Inputs ``[sequence, *initial states]``, outputs ``[per-step outputs, *final
    states]``, the states in seqcarry's order: h, c of each LSTM layer, h of each GRU
    or SimpleRNN layer, the window of past inputs of each causal Conv1D. Everything is
    computed by Keras' own layers (twins sharing the weights); recurrent layers return
    sequences, so a classifier's twin gives its output at every step.
    """
    import keras

    from transforms.models import keras_operations

    sequence_input = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype)
    twins = {id(model.inputs[0]): sequence_input}
    initial, final = [], []
    for layer, tensors, output in keras_operations(model):
        arguments = [twins[id(tensor)] for tensor in tensors]
        if layer is None:  # a nested model's input or output
            twins[id(output)] = arguments[0]
            continue
        if isinstance(layer, keras.layers.TimeDistributed):
            # The same per-step math; Keras 3.15's TimeDistributed computes wrong numbers
            # when traced with an unknown number of steps (its vectorized_map path).
            layer = layer.layer
        if isinstance(layer, (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)):
            twin = type(layer).from_config(layer.get_config() | {
                "return_state": True, "return_sequences": True})
            starts = [keras.Input((layer.units,))
                      for _ in range(2 if isinstance(layer, keras.layers.LSTM) else 1)]
            # With initial states as inputs Keras no longer passes the mask on by itself.
            value, *ends = twin(arguments[0], initial_state=starts,
                                mask=getattr(arguments[0], "_keras_mask", None))
            twin.set_weights(layer.get_weights())
            initial += starts
            final += ends
        elif isinstance(layer, keras.layers.Conv1D) and layer.kernel_size[0] > 1:
            value, start, end = _conv_with_window(layer, arguments[0])
            initial.append(start)
            final.append(end)
        else:
            value = layer(arguments if len(arguments) > 1 else arguments[0])
        twins[id(output)] = value
    return keras.Model([sequence_input, *initial], [twins[id(model.outputs[0])], *final])


def _conv_with_window(layer: Any, sequence: Any) -> tuple[Any, Any, Any]:
    """A causal Conv1D that starts from a window of past inputs instead of zeros: the
    window (an input, flattened) is put before the sequence and the same convolution
    runs without padding. Returns (outputs, window input, final window)."""
    import keras

    width = int(sequence.shape[-1])
    past = (layer.kernel_size[0] - 1) * layer.dilation_rate[0]
    start = keras.Input((past * width,))
    seen = keras.ops.concatenate([keras.ops.reshape(start, (-1, past, width)), sequence],
                                 axis=1)
    twin = type(layer).from_config(layer.get_config() | {"padding": "valid"})
    outputs = twin(seen)
    twin.set_weights(layer.get_weights())
    return outputs, start, keras.ops.reshape(seen[:, -past:], (-1, past * width))


def keras_whole_sequence(model: Any) -> Callable[..., tuple[np.ndarray, list[np.ndarray]]]:
    """A function mapping one whole sequence [steps, input_dim] (and optionally its
    initial states, zeros by default) to Keras' per-step outputs [steps, output_dim]
    and final states (in :func:`keras_with_state`'s order).

    ``model`` is a Keras model or a ``.keras`` path. For a model that starts with an
    ``Embedding``, features are [steps, 1] token ids.
    """
    import keras
    import tensorflow as tf

    if isinstance(model, str):
        model = keras.models.load_model(model, compile=False)
    reference = keras_with_state(model)
    dtype = model.inputs[0].dtype
    state_specs = [tf.TensorSpec([1, state.shape[-1]], tf.float32)
                   for state in reference.inputs[1:]]
    call = tf.function(lambda sequence, states: reference([sequence, *states]),
                       input_signature=[tf.TensorSpec([1, *model.input_shape[1:]], dtype),
                                        state_specs])

    def whole_sequence(features: np.ndarray, initial: Sequence[np.ndarray] | None = None
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
        sequence = features[:, 0] if len(model.input_shape) == 2 else features
        states = [np.zeros(spec.shape, np.float32) if initial is None else initial[k][None]
                  for k, spec in enumerate(state_specs)]
        outputs, *final = call(tf.constant(sequence[None], dtype), states)
        return outputs.numpy()[0], [s.numpy()[0] for s in final]

    return whole_sequence
