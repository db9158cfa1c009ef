"""Whole-sequence results computed by Keras itself: the oracle that the demo and the
tests compare the pipeline against. It shares no code with the kernel.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def keras_whole_sequence(
        model_path: str) -> Callable[[np.ndarray], tuple[np.ndarray, list[np.ndarray]]]:
    """A function mapping one whole sequence [steps, input_dim] to Keras' per-step
    outputs [steps, output_dim] and final states (h, c per LSTM layer, in order)."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(model_path, compile=False)
    inputs = keras.Input((None, model.input_shape[-1]))
    sequence, states = inputs, []
    for layer in model.layers:
        if isinstance(layer, keras.layers.LSTM):
            # A twin of the layer that also returns its final (h, c).
            twin = keras.layers.LSTM.from_config(layer.get_config() | {"return_state": True})
            sequence, h, c = twin(sequence)
            twin.set_weights(layer.get_weights())
            states += [h, c]
        else:
            sequence = layer(sequence)
    reference = keras.Model(inputs, [sequence] + states)
    call = tf.function(reference, input_signature=[
        tf.TensorSpec([1, None, model.input_shape[-1]], tf.float32)])

    def whole_sequence(features: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        outputs, *final = call(tf.constant(features[None], tf.float32))
        return outputs.numpy()[0], [s.numpy()[0] for s in final]

    return whole_sequence
