"""The batched, masked recurrent step: all of seqcarry's TensorFlow math.

:class:`StepKernel` runs a :class:`~transforms.model.RecurrentStack` over a batch of
right-padded sequences [batch, steps, input_dim] from given initial states. Each row
has its own length; on a row's padded steps its state is carried unchanged, so the
final state of every row is its state after its own last real step.

Each recurrent layer's math is chosen by its kind (``_LAYER_MATH``): LSTM (with TF1's
peepholes and projection as a separate function), GRU, and an opaque step function
(a SavedModel's ``step`` signature, called once per step inside the loop: the one
path where the kernel does not see the weights). Every path masks the same way.

Time is processed in windows of at most ``window_steps`` steps, so memory for the
intermediate activations is bounded by batch x window, and the compiled function
takes dynamic batch and window sizes: it is traced once per kernel, not per bundle.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from transforms.model import (ACTIVATIONS, EmbeddingLayer, GRULayer, LSTMLayer,
                              MaskingLayer, RecurrentStack, StepFunctionLayer)

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
    if layer.peepholes is not None or layer.projection is not None:
        return _lstm_peephole_projection_layer(layer, weights, inputs, mask, states)
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


def _input_projection(inputs: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """The whole window's input projection as one GEMM: [B, T, D] -> [T, B, G]."""
    batch, steps = tf.shape(inputs)[0], tf.shape(inputs)[1]
    projected = tf.matmul(tf.reshape(inputs, [-1, kernel.shape[0]]), kernel) + bias
    return tf.transpose(tf.reshape(projected, [batch, steps, kernel.shape[1]]), [1, 0, 2])


def _masked_loop(step, sequence: tf.Tensor, mask: tf.Tensor, states: Sequence[tf.Tensor],
                 initial_output: tf.Tensor):
    """Run ``step(sequence[t], states) -> (output, new states)`` over the time axis of
    ``sequence`` [T, B, ...]. Where ``mask`` [T, B, 1] is false the states stay as
    they were and the previous output is repeated (``initial_output`` before the first
    step), as Keras does. Returns (outputs [B, T, O], final states)."""
    steps = tf.shape(sequence)[0]
    outputs = tf.TensorArray(tf.float32, size=steps)

    def body(t, output, states, outputs):
        new_output, new_states = step(sequence[t], states)
        keep = mask[t]
        states = tuple(tf.where(keep, new, old) for new, old in zip(new_states, states))
        output = tf.where(keep, new_output, output)
        return t + 1, output, states, outputs.write(t, output)

    _, _, states, outputs = tf.while_loop(lambda t, *_: t < steps, body,
                                          (tf.constant(0), initial_output, tuple(states),
                                           outputs))
    return tf.transpose(outputs.stack(), [1, 0, 2]), states


def _lstm_peephole_projection_layer(layer: LSTMLayer, weights: Sequence[tf.Tensor],
                                    inputs: tf.Tensor, mask: tf.Tensor,
                                    states: Sequence[tf.Tensor]):
    """An LSTM with TF1 ``LSTMCell``'s peepholes and/or projection: the peepholes add
    w * c to the input and forget gates (previous c) and to the output gate (new c);
    the projection maps o * act(c) to h [B, P]. Python branches here are fixed at
    trace time, not data-dependent."""
    kernel, recurrent_kernel, bias, *extra = weights
    peepholes = extra.pop(0) if layer.peepholes is not None else None
    projection = extra.pop(0) if layer.projection is not None else None
    activation = _ACTIVATION_FUNCTIONS[layer.activation]
    gate = _ACTIVATION_FUNCTIONS[layer.recurrent_activation]

    def step(projected, states):
        h, c = states
        i, f, g, o = tf.split(projected + tf.matmul(h, recurrent_kernel), 4, axis=-1)
        if peepholes is not None:
            i, f = i + peepholes[0] * c, f + peepholes[1] * c
        c = gate(f) * c + gate(i) * activation(g)
        if peepholes is not None:
            o = o + peepholes[2] * c
        h = gate(o) * activation(c)
        if projection is not None:
            h = tf.matmul(h, projection)
        return h, (h, c)

    return _masked_loop(step, _input_projection(inputs, kernel, bias), mask, states,
                        states[0])


def _gru_layer(layer: GRULayer, weights: Sequence[tf.Tensor], inputs: tf.Tensor,
               mask: tf.Tensor, states: Sequence[tf.Tensor]):
    """One GRU layer over a window, Keras' math: z, r gates; with ``reset_after`` r
    multiplies (h @ U_h + b_h), else the candidate reads (r * h) @ U_h."""
    kernel, recurrent_kernel, bias = weights
    activation = _ACTIVATION_FUNCTIONS[layer.activation]
    gate = _ACTIVATION_FUNCTIONS[layer.recurrent_activation]
    units = layer.units
    input_bias = bias[0] if layer.reset_after else bias

    def step(projected, states):
        (h,) = states
        x_z, x_r, x_h = tf.split(projected, 3, axis=-1)
        if layer.reset_after:
            h_z, h_r, h_h = tf.split(tf.matmul(h, recurrent_kernel) + bias[1], 3, axis=-1)
            z, r = gate(x_z + h_z), gate(x_r + h_r)
            candidate = activation(x_h + r * h_h)
        else:
            h_z, h_r = tf.split(tf.matmul(h, recurrent_kernel[:, :2 * units]), 2, axis=-1)
            z, r = gate(x_z + h_z), gate(x_r + h_r)
            candidate = activation(x_h + tf.matmul(r * h, recurrent_kernel[:, 2 * units:]))
        h = z * h + (1.0 - z) * candidate
        return h, (h,)

    return _masked_loop(step, _input_projection(inputs, kernel, input_bias), mask, states,
                        states[0])


def _step_function_layer(layer: StepFunctionLayer, weights: Sequence[tf.Tensor],
                         inputs: tf.Tensor, mask: tf.Tensor, states: Sequence[tf.Tensor]):
    """A black-box step (a SavedModel signature), called once per time step inside the
    loop; its outputs on padded steps are never read."""

    def step(x, states):
        result = layer.function(x=x, **dict(zip(layer.names, states)))
        return result["outputs"], tuple(result[name] for name in layer.names)

    initial_output = tf.zeros([tf.shape(inputs)[0], layer.output_dim])
    return _masked_loop(step, tf.transpose(inputs, [1, 0, 2]), mask, states, initial_output)


# The math of each recurrent layer kind: (layer, weights, inputs, mask, states) ->
# (output sequence, new states), states in the order of the layer's ``state_parts``.
_LAYER_MATH = {"lstm": _lstm_layer, "gru": _gru_layer, "step_function": _step_function_layer}


def _input_stage(layer: EmbeddingLayer | MaskingLayer | None, weights: Sequence[tf.Tensor],
                 inputs: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The input layer: embedding lookup of token ids [B, T, 1], and Keras' input masks
    (``Masking``; ``Embedding(mask_zero=True)``) added to ``mask`` [T, B, 1]; masked
    steps leave every layer's state unchanged."""
    if isinstance(layer, MaskingLayer):
        keep = tf.reduce_any(tf.not_equal(inputs, layer.mask_value), axis=-1)
        return inputs, mask & tf.transpose(keep)[:, :, None]
    if isinstance(layer, EmbeddingLayer):
        ids = tf.cast(inputs[:, :, 0], tf.int32)  # validated on read: whole, in range
        if layer.mask_zero:
            mask = mask & tf.transpose(tf.not_equal(ids, 0))[:, :, None]
        return tf.gather(weights[0], ids), mask
    return inputs, mask


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
        self._input_weights = [tf.constant(w, tf.float32) for w in
                               (stack.input_layer.weights() if stack.input_layer else ())]
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
        sequence, mask = _input_stage(self.stack.input_layer, self._input_weights, inputs,
                                      mask)
        new_states, offset = [], 0
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
