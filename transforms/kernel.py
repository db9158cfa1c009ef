"""The batched, masked recurrent step: all of seqcarry's TensorFlow math.

:class:`StepKernel` runs a :class:`~transforms.models.RecurrentStack` over a batch of
right-padded sequences [batch, steps, input_dim] from given initial states. Each row
has its own length; on a row's padded steps its state is carried unchanged, so the
final state of every row is its state after its own last real step.

How it is fast (measured on 2 CPU cores, LSTM(128) + Dense(8), input width 32; see
``bench/bench.py``):

* **One loop over time for the whole model.** Each step runs every layer in order, the
  stateful ones as *cells* (one step), the per-step ones (dense, normalizations,
  merges) on that step's values, so nothing but the per-step outputs leaves the loop.
  The input projection is done per step (``x_t @ W + h @ U``), not as one GEMM over the
  whole window first: with 32 inputs and 4 x 128 gates the precomputed projection is
  16x larger than the inputs and the loop then streams it from memory; it measured
  ~1.4x plain Keras against ~1.9x for the per-step form under XLA.
* **XLA** (``jit_compile``) compiles the loop of one shard. Where XLA is disabled
  (``xla=False`` or ``SEQCARRY_XLA=0``), cannot compile the model, or is not asked
  for by a window (``run_window(xla=False)``: continuous batching asks only for large
  works, see :func:`~transforms.sequencing.uses_xla`), the same functions run as a
  plain ``tf.function`` (same math, results within float32 rounding of XLA's). XLA
  ran windows 0.9 to 4.3x as fast as plain here, and takes 0.3 to 0.5 s more to
  compile each shape.
  Whether XLA can compile the model is decided once, by the first window that asks
  for it (the first compile it needs anyway; reading ``xla`` before that compiles the
  smallest shape to decide): a model XLA refuses runs plain from then on, and an
  error after that is an error. TensorFloat-32 is turned off, so matrix products
  stay float32 on GPUs that have it.
* **Static, bucketed shapes**: time is cut into windows of ``window_steps`` (the last
  one padded up to a power of two), the batch is padded up to a bucket (at most four
  per octave: 64, 80, 96, 112, 128, 160, ...), so a kernel compiles a small, bounded
  number of programs (``compiled_shapes``), lazily, ~0.3 s each for a small model.
* **Shards**: a batch is cut into ``shards`` slices (by default one per CPU core, at
  least 64 rows each) that run concurrently, each its own single XLA program; an
  outer (not compiled) function runs them in parallel on TensorFlow's inter-op pool.
* **Masking only where rows end**: in a window where rows have lengths ``lengths``,
  steps before ``min(lengths)`` run unmasked, steps up to ``max(lengths)`` run masked
  (``tf.where`` keeps a finished row's state bit for bit), and steps after that do
  not run at all. Padded rows get the window's longest length so they never force
  masking.

Layer math, per layer kind (``layer.kind``), in three tables: ``_STEP_MATH`` for the
per-step layers (``(layer, weights, values it reads) -> value``, on [B, D] or
[B, T, D]), and for the layers that carry state:

* ``_CELL_MATH[kind]``: ``(layer, weights, inputs [B, D], states tuple) ->
  (output [B, U], new states tuple)``: one step, no masking (the kernel masks the
  states). A kind with a cell runs in the fused loop above.
* ``_LAYER_MATH[kind]``: ``(layer, weights, inputs [B, T, D], mask [T, B, 1],
  states tuple) -> (output sequence [B, T, U], states tuple)``: a whole window under
  any mask (masked steps keep the state and repeat the previous output, as Keras
  does). The kernel runs the model layer by layer with these when a layer has no
  cell (a SavedModel's opaque ``step`` signature: the one path where the kernel
  does not see the weights) or when the input layer masks steps in the middle
  of a sequence (Keras ``Masking``, ``Embedding(mask_zero=True)``).

Kinds with cells: LSTM (with TF1's peepholes and projection), GRU, SimpleRNN and
causal Conv1D (its state: the window of its past inputs).
States are in the order of the layer's ``state_parts``. A new kind writes its cell and registers
``_LAYER_MATH[kind] = _layer_from_cell(cell)``; a kind that cannot be written as a
cell registers only a ``_LAYER_MATH`` function.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from transforms.models import (ACTIVATIONS, MERGE_OPERATIONS, BatchNormLayer, CausalConvLayer,
                               DenseLayer, EmbeddingLayer, GRULayer, LayerNormLayer, LSTMLayer,
                               MaskingLayer, RecurrentStack, SimpleRNNLayer, StepFunctionLayer,
                               masks_inputs)

_LOG = logging.getLogger("seqcarry")

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

# Environment switch for XLA: "0", "false", "off" or "no" run the plain tf.function path
# everywhere; "1", "true", "on" or "yes" XLA for every window, small works included;
# unset (or "auto"): XLA for large works only (see transforms.sequencing.uses_xla).
XLA_ENV = "SEQCARRY_XLA"
# Smallest number of rows worth a shard of its own.
MIN_SHARD_ROWS = 64
# Shortest padded width of a last, partial window.
MIN_WINDOW_WIDTH = 16

# The exceptions with which XLA refuses or fails to compile a program.
_XLA_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
               tf.errors.InternalError, tf.errors.NotFoundError, tf.errors.UnknownError)


def _lstm_cell(layer: LSTMLayer, weights: Sequence[tf.Tensor], inputs: tf.Tensor,
               states: Sequence[tf.Tensor]):
    """One LSTM step: inputs [B, D], states (h, c) -> (h, (h, c)).

    With TF1 ``LSTMCell``'s peepholes, w * c is added to the input and forget gates
    (previous c) and to the output gate (new c); with its projection, h = (o * act(c))
    @ projection [B, P]. These branches are fixed at trace time.
    """
    kernel, recurrent_kernel, bias, *extra = weights
    peepholes = extra.pop(0) if layer.peepholes is not None else None
    projection = extra.pop(0) if layer.projection is not None else None
    h, c = states
    activation = _ACTIVATION_FUNCTIONS[layer.activation]
    gate = _ACTIVATION_FUNCTIONS[layer.recurrent_activation]
    z = tf.matmul(inputs, kernel) + tf.matmul(h, recurrent_kernel) + bias
    i, f, g, o = tf.split(z, 4, axis=-1)
    if peepholes is not None:
        i, f = i + peepholes[0] * c, f + peepholes[1] * c
    c = gate(f) * c + gate(i) * activation(g)
    if peepholes is not None:
        o = o + peepholes[2] * c
    h = gate(o) * activation(c)
    if projection is not None:
        h = tf.matmul(h, projection)
    return h, (h, c)


def _gru_cell(layer: GRULayer, weights: Sequence[tf.Tensor], inputs: tf.Tensor,
              states: Sequence[tf.Tensor]):
    """One GRU step, Keras' math: z, r gates; with ``reset_after`` r multiplies
    (h @ U_h + b_h), else the candidate reads (r * h) @ U_h."""
    kernel, recurrent_kernel, bias = weights
    activation = _ACTIVATION_FUNCTIONS[layer.activation]
    gate = _ACTIVATION_FUNCTIONS[layer.recurrent_activation]
    units = layer.units
    (h,) = states
    x_z, x_r, x_h = tf.split(tf.matmul(inputs, kernel) + (bias[0] if layer.reset_after
                                                          else bias), 3, axis=-1)
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


def _simple_rnn_cell(layer: SimpleRNNLayer, weights: Sequence[tf.Tensor], inputs: tf.Tensor,
                     states: Sequence[tf.Tensor]):
    """One SimpleRNN step: h = activation(x @ W + h @ U + b)."""
    kernel, recurrent_kernel, bias = weights
    (h,) = states
    h = _ACTIVATION_FUNCTIONS[layer.activation](
        tf.matmul(inputs, kernel) + bias + tf.matmul(h, recurrent_kernel))
    return h, (h,)


def _causal_conv_cell(layer: CausalConvLayer, weights: Sequence[tf.Tensor],
                      inputs: tf.Tensor, states: Sequence[tf.Tensor]):
    """One step of a causal convolution: the carried window of past inputs [B, W * D]
    (oldest first) and this step's input [B, D] -> (output [B, filters], new window)."""
    kernel, bias = weights
    if not layer.window:
        return _ACTIVATION_FUNCTIONS[layer.activation](tf.matmul(inputs, kernel[0]) + bias), ()
    (window,) = states
    seen = tf.concat([tf.reshape(window, [-1, layer.window, layer.input_dim]),
                      inputs[:, None, :]], axis=1)
    taps = seen[:, ::layer.dilation]  # [B, kernel_size, D], oldest tap first
    output = tf.einsum("bkd,kdu->bu", taps, kernel) + bias
    return (_ACTIVATION_FUNCTIONS[layer.activation](output),
            (tf.reshape(seen[:, 1:], [-1, layer.window * layer.input_dim]),))


def _project(values: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """values [..., D] @ kernel [D, U], for one step [B, D] or a window [B, T, D]."""
    if values.shape.rank == 2:
        return tf.matmul(values, kernel)
    return tf.einsum("btd,du->btu", values, kernel)


def _dense(layer: DenseLayer, weights: Sequence[tf.Tensor], values: Sequence[tf.Tensor]):
    kernel, bias = weights
    return _ACTIVATION_FUNCTIONS[layer.activation](_project(values[0], kernel) + bias)


def _layer_norm(layer: LayerNormLayer, weights: Sequence[tf.Tensor],
                values: Sequence[tf.Tensor]):
    """Keras 3's arithmetic: x * inv + (beta - mean * inv), inv = gamma / std."""
    gamma, beta = weights
    (x,) = values
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    inv = tf.math.rsqrt(variance + layer.epsilon) * gamma
    if layer.rms_scaling:
        return x * inv
    return x * inv + (beta - mean * inv)


def _batch_norm(layer: BatchNormLayer, weights: Sequence[tf.Tensor],
                values: Sequence[tf.Tensor]):
    mean, variance, gamma, beta = weights
    return tf.nn.batch_normalization(values[0], mean, variance, beta, gamma, layer.epsilon)


_MERGE_FUNCTIONS = {
    "add": tf.add_n,
    "subtract": lambda values: values[0] - values[1],
    "multiply": lambda values: functools.reduce(tf.multiply, values),
    "average": lambda values: tf.add_n(values) / len(values),
    "maximum": lambda values: functools.reduce(tf.maximum, values),
    "minimum": lambda values: functools.reduce(tf.minimum, values),
    "concatenate": lambda values: tf.concat(values, axis=-1),
}
assert set(_MERGE_FUNCTIONS) == set(MERGE_OPERATIONS)

# Each per-step (stateless) layer kind: (layer, weights, values it reads, each [B, D]
# or [B, T, D]) -> its value, the same shape but for the last axis.
_STEP_MATH = {
    "dense": _dense,
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "activation": lambda layer, weights, values: _ACTIVATION_FUNCTIONS[layer.activation](
        values[0]),
    "merge": lambda layer, weights, values: _MERGE_FUNCTIONS[layer.operation](list(values)),
}


def _masked_loop(step: Callable, steps, lengths: tf.Tensor, states: tuple):
    """Run ``step(t, states) -> (output [B, U], states)`` for t in [0, max(lengths)).

    Rows whose length is reached keep their states (bit for bit); only steps at or
    after ``min(lengths)`` pay for that mask. Returns the outputs as a TensorArray of
    ``steps`` elements (zeros after ``max(lengths)``) and the final states.
    """
    full, longest = tf.reduce_min(lengths), tf.reduce_max(lengths)

    def plain(t, states, outputs):
        output, states = step(t, states)
        return t + 1, tuple(states), outputs.write(t, output)

    def masked(t, states, outputs):
        output, new_states = step(t, states)
        keep = (t < lengths)[:, None]
        states = tuple(tf.where(keep, new, old) for new, old in zip(new_states, states))
        return t + 1, states, outputs.write(t, output)

    outputs = tf.TensorArray(tf.float32, size=steps)
    t, states, outputs = tf.while_loop(lambda t, *_: t < full, plain,
                                       (tf.constant(0), tuple(states), outputs))
    _, states, outputs = tf.while_loop(lambda t, *_: t < longest, masked,
                                       (t, states, outputs))
    return outputs, states


def _time_major(inputs: tf.Tensor) -> tf.Tensor:
    return tf.transpose(inputs, [1, 0, 2])


def _masked_window(step: Callable, series: tf.Tensor, mask: tf.Tensor,
                   states: Sequence[tf.Tensor], initial_output: tf.Tensor):
    """Run ``step(series[t], states) -> (output, new states)`` over the time axis of
    ``series`` [T, B, ...] under any ``mask`` [T, B, 1] (Keras' ``Masking`` too):
    where it is false the states stay as they were and the previous output is
    repeated (``initial_output`` before the first step), as Keras does.
    Returns (outputs [B, T, O], final states)."""
    steps = tf.shape(series)[0]
    outputs = tf.TensorArray(tf.float32, size=steps)

    def body(t, output, states, outputs):
        new_output, new_states = step(series[t], states)
        keep = mask[t]
        states = tuple(tf.where(keep, new, old) for new, old in zip(new_states, states))
        output = tf.where(keep, new_output, output)
        return t + 1, output, states, outputs.write(t, output)

    _, _, states, outputs = tf.while_loop(lambda t, *_: t < steps, body,
                                          (tf.constant(0), initial_output, tuple(states),
                                           outputs))
    return _time_major(outputs.stack()), states


def _layer_from_cell(cell: Callable) -> Callable:
    """The ``_LAYER_MATH`` function (a whole window, any mask) of a ``_CELL_MATH`` cell
    whose output is its first state part (h)."""

    def layer_math(layer, weights, inputs, mask, states):
        return _masked_window(lambda x, states: cell(layer, weights, x, states),
                              _time_major(inputs), mask, states, states[0])

    layer_math.__doc__ = f"A window of {cell.__name__} under a mask (see _masked_window)."
    return layer_math


def _step_function_layer(layer: StepFunctionLayer, weights: Sequence[tf.Tensor],
                         inputs: tf.Tensor, mask: tf.Tensor, states: Sequence[tf.Tensor]):
    """A black-box step (a SavedModel signature), called once per time step inside the
    loop; its outputs on padded steps are never read."""

    def step(x, states):
        result = layer.function(x=x, **dict(zip(layer.names, states)))
        return result["outputs"], tuple(result[name] for name in layer.names)

    initial_output = tf.zeros([tf.shape(inputs)[0], layer.output_dim])
    return _masked_window(step, _time_major(inputs), mask, states, initial_output)


# One step of each recurrent layer kind: (layer, weights, inputs [B, D], states) ->
# (output [B, U], new states), states in the order of the layer's ``state_parts``.
_CELL_MATH = {"lstm": _lstm_cell, "gru": _gru_cell, "simple_rnn": _simple_rnn_cell,
              "conv1d": _causal_conv_cell}
# A window of each recurrent layer kind: (layer, weights, inputs [B, T, D],
# mask [T, B, 1], states) -> (output sequence [B, T, U], new states).
_LAYER_MATH = {"lstm": _layer_from_cell(_lstm_cell), "gru": _layer_from_cell(_gru_cell),
               "simple_rnn": _layer_from_cell(_simple_rnn_cell),
               "step_function": _step_function_layer}


def _apply_with_mask(math: Callable, mask: tf.Tensor, layer, weights, inputs, states):
    return math(layer, weights, inputs, mask, states)


def _input_stage(layer: EmbeddingLayer | MaskingLayer | None, weights: Sequence[tf.Tensor],
                 inputs: tf.Tensor, mask: tf.Tensor | None):
    """The input layer: embedding lookup of token ids [B, T, 1], and Keras' input masks
    (``Masking``; ``Embedding(mask_zero=True)``) added to ``mask`` [T, B, 1]; masked
    steps leave every layer's state unchanged."""
    if isinstance(layer, MaskingLayer):
        keep = tf.reduce_any(tf.not_equal(inputs, layer.mask_value), axis=-1, keepdims=True)
        # Keras' Masking also zeroes the masked steps (seen by skip connections).
        return (inputs * tf.cast(keep, inputs.dtype),
                mask & tf.transpose(keep, [1, 0, 2]))
    if isinstance(layer, EmbeddingLayer):
        ids = tf.cast(inputs[:, :, 0], tf.int32)  # validated on read: whole, in range
        if layer.mask_zero:
            mask = mask & tf.transpose(tf.not_equal(ids, 0))[:, :, None]
        return tf.gather(weights[0], ids), mask
    return inputs, mask


def xla_setting(mode: str = "auto") -> bool | None:
    """``StepKernel``'s ``xla`` for ``--xla`` ``mode``: False (off), True (on, for every
    window) or None (for large works); for ``auto``, what this process's
    ``SEQCARRY_XLA`` environment variable says (unset: None)."""
    value = (os.environ.get(XLA_ENV, "auto") if mode == "auto" else mode).strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    return True if value in ("1", "true", "on", "yes") else None


def batch_bucket(rows: int) -> int:
    """``rows`` rounded up to a bucket: 1..8 -> 8, then four buckets per octave
    (..., 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ...), so at most 25% padding."""
    if rows <= 8:
        return 8
    step = 1 << max(0, (rows - 1).bit_length() - 3)
    return -(-rows // step) * step


def window_width(steps: int, window_steps: int) -> int:
    """The padded width of a window of ``steps`` real steps: ``window_steps`` for a
    full one, else the next power of two (at least 16), at most ``window_steps``."""
    if steps >= window_steps:
        return window_steps
    return min(window_steps, max(MIN_WINDOW_WIDTH, 1 << (steps - 1).bit_length()))


def _default_shards() -> int:
    if tf.config.list_logical_devices("GPU"):
        return 1
    return max(1, os.cpu_count() or 1)


class StepKernel:
    """A compiled, batched, masked step function for one model.

    One kernel serves every thread of a process (``run`` is thread-safe). ``xla``:
    False runs every window as a plain tf.function; otherwise windows that ask for it
    (``run_window(xla=True)``, the default) run XLA-compiled. Continuous batching asks
    for it on large works only, unless ``xla_for_small_works``: True for ``xla=True``;
    for None (the default), what ``SEQCARRY_XLA`` says (see :data:`XLA_ENV`). The first
    window compiled with XLA decides for good: if XLA cannot compile the model, the
    kernel uses plain tf.functions from then on (``xla`` is then False and an
    ``event=xla_unavailable`` warning says why). ``shards``: slices of
    the batch run concurrently (default: one per CPU core, at least 64 rows each; 1 on
    a GPU).

    ``traces`` counts how often TensorFlow traced a window function: once per
    compiled shape (``compiled_shapes``: (shards, rows per shard, window width)) and
    path (``compiled_programs``), so tests assert it stays bounded whatever the
    batches.
    """

    def __init__(self, stack: RecurrentStack, window_steps: int = 256,
                 xla: bool | None = None, shards: int | None = None):
        if window_steps < 1:
            raise ValueError("window_steps must be at least 1")
        if shards is not None and shards < 1:
            raise ValueError("shards must be at least 1")
        # Where the hardware has TensorFloat-32 (Ampere and newer GPUs), TensorFlow
        # would use its 10-bit mantissa for float32 matrix products by default.
        tf.config.experimental.enable_tensor_float_32_execution(False)
        self.stack = stack
        self.window_steps = window_steps
        setting = xla_setting() if xla is None else xla
        # Whether run_continuous asks for XLA whatever the size of the work.
        self.xla_for_small_works = setting is True
        # None: XLA allowed, not yet tried (see _call_window).
        self._xla: bool | None = None if setting is not False else False
        self._deciding = threading.Lock()
        self.max_shards = shards or _default_shards()
        self.traces = 0
        self._programs: set[tuple[str, int, int, int]] = set()
        self._lock = threading.Lock()
        self._weights = [[tf.constant(w, tf.float32) for w in layer.weights()]
                         for layer in stack.layers]
        self._input_weights = [tf.constant(w, tf.float32) for w in
                               (stack.input_layer.weights() if stack.input_layer else ())]
        # The fused loop masks only where rows end; input masks need the layer path.
        self._fused = (all(layer.kind in _CELL_MATH for layer in stack.recurrent)
                       and not masks_inputs(stack.input_layer))
        offsets = np.cumsum([0] + [len(layer.state_parts) for layer in stack.layers])
        # Where each layer's state parts sit among the carried ones (none: per-step).
        self._state_slices = [slice(offsets[k], offsets[k + 1])
                              for k in range(len(stack.layers))]
        self._windows: dict[bool, Callable] = {}  # by xla, each built when first used

    @property
    def xla(self) -> bool:
        """Whether windows asking for XLA run XLA-compiled. Read before the first such
        window, it decides by compiling the smallest shape (one shard of 8 rows, the
        shortest window)."""
        if self._xla is None:
            rows, width = batch_bucket(1), window_width(1, self.window_steps)
            self._call_window(tf.zeros((rows, width, self.stack.input_dim)),
                              tf.ones((rows,), tf.int32),
                              tuple(tf.zeros((rows, size)) for size in self.stack.state_sizes),
                              1)
        return self._xla

    def _call_window(self, *arguments, xla: bool = True):
        """The window function on ``arguments``, XLA-compiled if ``xla`` and XLA is
        allowed. The first call for XLA decides: if XLA refuses the model, windows run
        plain, for good."""
        if not xla or self._xla is False:
            return self._window(False)(*arguments)
        if self._xla:
            return self._window(True)(*arguments)
        with self._deciding:
            if self._xla is None:
                try:
                    result = self._window(True)(*arguments)
                except _XLA_ERRORS as error:
                    _LOG.warning("event=xla_unavailable fingerprint=%s reason=%s",
                                 self.stack.fingerprint,
                                 str(error).strip().splitlines()[0][:300])
                    self._xla = False
                else:
                    self._xla = True
                    return result
        return self._call_window(*arguments, xla=xla)

    def _window(self, xla: bool) -> Callable:
        with self._lock:
            if xla not in self._windows:
                self._windows[xla] = self._build(xla)
            return self._windows[xla]

    @property
    def compiled_shapes(self) -> frozenset[tuple[int, int, int]]:
        """(shards, rows per shard, window width) of every program traced so far."""
        return frozenset(program[1:] for program in self.compiled_programs)

    @property
    def compiled_programs(self) -> frozenset[tuple[str, int, int, int]]:
        """(path: ``"xla"`` or ``"plain"``, shards, rows per shard, window width) of
        every program traced so far."""
        with self._lock:
            return frozenset(self._programs)

    def _build(self, xla: bool):
        shard = tf.function(self._shard_math, jit_compile=xla, autograph=False)

        def window(inputs, lengths, states, shards):
            with self._lock:  # runs at trace time only
                self.traces += 1
                self._programs.add(("xla" if xla else "plain", shards,
                                    inputs.shape[0] // shards, inputs.shape[1]))
            # Independent calls: TensorFlow's executor runs the shards concurrently.
            pieces = [shard(x, n, s) for x, n, s in zip(
                tf.split(inputs, shards), tf.split(lengths, shards),
                zip(*(tf.split(part, shards) for part in states)))]
            if shards == 1:
                return pieces[0]
            return (tf.concat([p[0] for p in pieces], 0),
                    tuple(tf.concat([p[1][k] for p in pieces], 0) for k in range(len(states))))

        return tf.function(window, autograph=False)

    def _graph(self, model_input: tf.Tensor, states: Sequence[tf.Tensor], layer_math: dict):
        """The model's layers on ``model_input`` (one step [B, D], or a window [B, T, D]
        with ``layer_math`` taking the mask), each reading the values it names; the
        stateful ones through ``layer_math``. Returns (output, new states)."""
        values, new_states = [model_input], []
        for index, (layer, reads) in enumerate(zip(self.stack.layers, self.stack.inputs)):
            read = [values[value] for value in reads]
            if layer.kind in _STEP_MATH:
                values.append(_STEP_MATH[layer.kind](layer, self._weights[index], read))
                continue
            value, layer_states = layer_math[layer.kind](
                layer, self._weights[index], read[0],
                tuple(states[self._state_slices[index]]))
            values.append(value)
            new_states += layer_states
        return values[-1], tuple(new_states)

    def _shard_math(self, inputs, lengths, states):
        """One shard's window: inputs [B, W, D], lengths [B] -> outputs [B, W, out], states."""
        mask = tf.transpose(tf.sequence_mask(lengths, tf.shape(inputs)[1]))[:, :, None]
        inputs, mask = _input_stage(self.stack.input_layer, self._input_weights, inputs, mask)
        if self._fused:
            series = _time_major(inputs)
            outputs, states = _masked_loop(
                lambda t, states: self._graph(series[t], states, _CELL_MATH),
                inputs.shape[1], lengths, tuple(states))
            return _time_major(outputs.stack()), states
        with_mask = {kind: functools.partial(_apply_with_mask, math, mask)
                     for kind, math in _LAYER_MATH.items()}
        return self._graph(inputs, states, with_mask)

    def padded_rows(self, batch: int) -> int:
        """The rows a batch of ``batch`` rows runs on, padding included."""
        shards, rows_per_shard = self._layout(batch)
        return shards * rows_per_shard

    def _layout(self, batch: int) -> tuple[int, int]:
        """(shards, rows per shard) for a batch of ``batch`` rows."""
        shards = max(1, min(self.max_shards, batch // MIN_SHARD_ROWS))
        return shards, batch_bucket(-(-batch // shards))

    def run(self, inputs: np.ndarray, lengths: np.ndarray,
            states: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the stack over right-padded ``inputs`` [B, T, input_dim].

        ``lengths`` [B] are the real steps of each row; ``states`` holds one
        [B, size] array per state part. Returns outputs [B, T, output_dim] (rows are
        meaningless past their length) and the states after each row's last real step.
        """
        inputs = np.asarray(inputs, np.float32)
        batch, total_steps = inputs.shape[0], inputs.shape[1]
        outputs = np.zeros((batch, total_steps, self.stack.output_dim), np.float32)
        lengths = np.minimum(np.asarray(lengths, np.int64), total_steps)
        states = [np.asarray(s, np.float32) for s in states]
        for start in range(0, total_steps if batch else 0, self.window_steps):
            window_lengths = np.clip(lengths - start, 0, self.window_steps)
            longest = int(window_lengths.max())
            if longest == 0:
                break  # every row has ended: the states stay, the outputs are zeros
            window_outputs, states = self.run_window(inputs[:, start:start + longest],
                                                     window_lengths, states)
            outputs[:, start:start + longest] = window_outputs
        return outputs, states

    def run_window(self, inputs: np.ndarray, lengths: np.ndarray,
                   states: Sequence[np.ndarray], rows: int = 0, xla: bool = True
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One window of at most ``window_steps`` steps: ``inputs`` [B, W, input_dim],
        ``lengths`` [B] the real steps of each row in it (0: the row rests, its state
        unchanged), ``states`` one [B, size] array per state part. The batch is padded
        to at least ``rows`` rows (a caller keeping few compiled shapes); ``xla``: False
        runs it plain, True XLA-compiled where allowed (see the class). Returns the
        outputs [B, W, output_dim] (meaningless past each length) and the states after
        each row's last real step."""
        inputs = np.asarray(inputs, np.float32)
        batch, steps = inputs.shape[0], inputs.shape[1]
        if steps > self.window_steps:
            raise ValueError(f"a window has at most {self.window_steps} steps, not {steps}")
        lengths = np.minimum(np.asarray(lengths, np.int64), steps).astype(np.int32)
        outputs = np.zeros((batch, steps, self.stack.output_dim), np.float32)
        longest = int(lengths.max()) if batch else 0
        if longest <= 0:
            return outputs, [np.array(s, np.float32) for s in states]
        shards, rows_per_shard = self._layout(max(batch, rows))
        padded = shards * rows_per_shard
        width = window_width(longest, self.window_steps)
        window_inputs = np.zeros((padded, width, self.stack.input_dim), np.float32)
        window_inputs[:batch, :longest] = inputs[:, :longest]
        # Padded rows run as long as the longest real row: no extra masked steps.
        window_lengths = np.concatenate([lengths, np.full(padded - batch, longest, np.int32)])
        window_outputs, new_states = self._call_window(
            tf.constant(window_inputs), tf.constant(window_lengths),
            tuple(tf.constant(_pad_rows(np.asarray(s, np.float32), padded)) for s in states),
            shards, xla=xla)
        outputs[:, :longest] = window_outputs.numpy()[:batch, :longest]
        return outputs, [s.numpy()[:batch] for s in new_states]


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    if array.shape[0] == rows:
        return array
    padding = np.zeros((rows - array.shape[0],) + array.shape[1:], array.dtype)
    return np.concatenate([array, padding])
