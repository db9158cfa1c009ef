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
    or SimpleRNN layer. Everything is computed by Keras' own layers (twins sharing the weights).
    """
    import keras

    sequence_input = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype)
    sequence, initial, final = sequence_input, [], []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.layers.TimeDistributed):
            # The same per-step math; Keras 3.15's TimeDistributed computes wrong numbers
            # when traced with an unknown number of steps (its vectorized_map path).
            layer = layer.layer
        if isinstance(layer, (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)):
            twin = type(layer).from_config(layer.get_config() | {"return_state": True})
            starts = [keras.Input((layer.units,))
                      for _ in range(2 if isinstance(layer, keras.layers.LSTM) else 1)]
            # With initial states as inputs Keras no longer passes the mask on by itself.
            sequence, *ends = twin(sequence, initial_state=starts,
                                   mask=getattr(sequence, "_keras_mask", None))
            twin.set_weights(layer.get_weights())
            initial += starts
            final += ends
        else:
            sequence = layer(sequence)
    return keras.Model([sequence_input, *initial], [sequence, *final])


def keras_whole_sequence(model: Any) -> Callable[..., tuple[np.ndarray, list[np.ndarray]]]:
    """A function mapping one whole sequence [steps, input_dim] (and optionally its
    initial states, zeros by default) to Keras' per-step outputs [steps, output_dim]
    and final states (h, c per LSTM layer, h per GRU or SimpleRNN layer, in order).

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
