"""The batched, masked recurrent step: all of seqcarry's TensorFlow math.

:class:`StepKernel` runs a :class:`~transforms.model.RecurrentStack` over a batch of
right-padded sequences [batch, steps, input_dim] from given initial states. Each row
has its own length; on a row's padded steps its state is carried unchanged, so the
final state of every row is its state after its own last real step.

Time is processed in windows of at most ``window_steps`` steps, so memory for the
intermediate activations is bounded by batch x window, and the compiled function
takes dynamic batch and window sizes: it is traced once per kernel, not per bundle.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from transforms.model import ACTIVATIONS, LSTMLayer, RecurrentStack

_ACTIVATION_FUNCTIONS = {
    "linear": tf.identity,
    "tanh": tf.tanh,
    "sigmoid": tf.sigmoid,
    "hard_sigmoid": lambda x: tf.nn.relu6(x + 3.0) / 6.0,  # Keras 3's definition
    "relu": tf.nn.relu,
    "softmax": tf.nn.softmax,
    "elu": tf.nn.elu,
    "softplus": tf.nn.softplus,
    "swish": tf.nn.silu,
    "silu": tf.nn.silu,
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
}
assert set(_ACTIVATION_FUNCTIONS) == set(ACTIVATIONS)


def _lstm_layer(layer: LSTMLayer, weights: Sequence[tf.Tensor], inputs: tf.Tensor,
                mask: tf.Tensor, states: Sequence[tf.Tensor]):
    """One LSTM layer over a window: inputs [B, T, D], mask [T, B, 1], states (h, c)
    -> (h_seq [B, T, U], (h, c))."""
    kernel, recurrent_kernel, bias = weights
    h, c = states
    activation = _ACTIVATION_FUNCTIONS[layer.activation]
    gate = _ACTIVATION_FUNCTIONS[layer.recurrent_activation]
    batch, steps = tf.shape(inputs)[0], tf.shape(inputs)[1]
    # The input projection of the whole window is one GEMM; only h @ U stays in the loop.
    projected = tf.reshape(
        tf.matmul(tf.reshape(inputs, [-1, layer.input_dim]), kernel) + bias,
        [batch, steps, 4 * layer.units])
    projected = tf.transpose(projected, [1, 0, 2])
    outputs = tf.TensorArray(tf.float32, size=steps)

    def step(t, h, c, outputs):
        z = projected[t] + tf.matmul(h, recurrent_kernel)
        i, f, g, o = tf.split(z, 4, axis=-1)
        c_next = gate(f) * c + gate(i) * activation(g)
        h_next = gate(o) * activation(c_next)
        keep = mask[t]
        h = tf.where(keep, h_next, h)
        c = tf.where(keep, c_next, c)
        return t + 1, h, c, outputs.write(t, h)

    _, h, c, outputs = tf.while_loop(lambda t, *_: t < steps, step,
                                     (tf.constant(0), h, c, outputs))
    return tf.transpose(outputs.stack(), [1, 0, 2]), (h, c)


# The math of each recurrent layer kind: (layer, weights, inputs, mask, states) ->
# (output sequence, new states), states in the order of the layer's ``state_parts``.
_LAYER_MATH = {"lstm": _lstm_layer}


class StepKernel:
    """A compiled, batched, masked step function for one model.

    ``traces`` counts how often TensorFlow traced the function (tests assert it stays 1).
    """

    def __init__(self, stack: RecurrentStack, window_steps: int = 256):
        if window_steps < 1:
            raise ValueError("window_steps must be at least 1")
        self.stack = stack
        self.window_steps = window_steps
        self.traces = 0
        self._weights = [[tf.constant(w, tf.float32) for w in layer.weights()]
                         for layer in stack.recurrent + stack.head]
        state_specs = tuple(tf.TensorSpec([None, size], tf.float32)
                            for size in stack.state_sizes)
        self._window = tf.function(self._window_math, input_signature=[
            tf.TensorSpec([None, None, stack.input_dim], tf.float32),
            tf.TensorSpec([None], tf.int32),
            state_specs,
        ])

    def _window_math(self, inputs, lengths, states):
        self.traces += 1  # runs at trace time only
        mask = tf.transpose(tf.sequence_mask(lengths, tf.shape(inputs)[1]))[:, :, None]
        sequence, new_states, offset = inputs, [], 0
        for index, layer in enumerate(self.stack.recurrent):
            parts = len(layer.state_parts)
            sequence, layer_states = _LAYER_MATH[layer.kind](
                layer, self._weights[index], sequence, mask, states[offset:offset + parts])
            new_states += layer_states
            offset += parts
        for index, layer in enumerate(self.stack.head, start=len(self.stack.recurrent)):
            kernel, bias = self._weights[index]
            sequence = _ACTIVATION_FUNCTIONS[layer.activation](
                tf.einsum("btd,du->btu", sequence, kernel) + bias)
        return sequence, tuple(new_states)

    def run(self, inputs: np.ndarray, lengths: np.ndarray,
            states: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the stack over right-padded ``inputs`` [B, T, input_dim].

        ``lengths`` [B] are the real steps of each row; ``states`` holds one
        [B, size] array per state part. Returns outputs [B, T, output_dim] (rows are
        meaningless past their length) and the states after each row's last real step.
        """
        batch, total_steps = inputs.shape[0], inputs.shape[1]
        outputs = np.empty((batch, total_steps, self.stack.output_dim), np.float32)
        current = tuple(tf.constant(s, tf.float32) for s in states)
        lengths = np.asarray(lengths, np.int64)
        for start in range(0, total_steps, self.window_steps):
            stop = min(start + self.window_steps, total_steps)
            window_lengths = np.clip(lengths - start, 0, stop - start).astype(np.int32)
            window_out, current = self._window(
                tf.constant(inputs[:, start:stop], tf.float32),
                tf.constant(window_lengths), current)
            outputs[:, start:stop] = window_out.numpy()
        return outputs, [s.numpy() for s in current]
