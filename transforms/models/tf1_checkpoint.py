"""The ``tf1-checkpoint`` format: TF1 checkpoints written by ``tf.train.Saver``,
variable names -> seqcarry layers. TensorFlow is imported only when loading.

What is recognized, by the variable names TF1 gives (after any ``--tf1-scope``
renames):

* RNN cells at ``<rnn>/<cell>/...`` (one cell) or ``<rnn>/multi_rnn_cell/cell_<K>/<cell>/...``
  (a ``MultiRNNCell`` stack, layer K), where ``<rnn>`` is the ``dynamic_rnn`` scope
  (``rnn`` by default) and ``<cell>`` is

  - ``basic_lstm_cell`` (``BasicLSTMCell``) or ``lstm_cell`` (``LSTMCell``): ``kernel``
    [input + h, 4 * units] and ``bias`` [4 * units], gates i, j (candidate), f, o, with
    ``forget_bias`` added to f at run time; ``LSTMCell`` may add peepholes
    (``w_i_diag``, ``w_f_diag``, ``w_o_diag``) and a projection (``projection/kernel``
    [units, num_proj], then h has num_proj values);
  - ``gru_cell`` (``GRUCell``): ``gates/kernel`` [input + units, 2 * units] (r, u),
    ``gates/bias``, ``candidate/kernel`` [input + units, units], ``candidate/bias``.

* An output projection applied to every step's h, if present: ``softmax_w`` /
  ``softmax_b``, ``output/kernel`` / ``output/bias``, ``dense/kernel`` / ``dense/bias``,
  ``logits/kernel`` / ``logits/bias`` or ``fully_connected/weights`` /
  ``fully_connected/biases`` (logits: no activation). If several are present,
  ``output`` is used.

Each is converted to Keras' layout (LSTM gates i, f, c, o with ``forget_bias`` folded
into the bias; GRU gates z, r, h with ``reset_after=False``, TF1's u being Keras' z:
both compute h = z * h_prev + (1 - z) * candidate), so the fingerprint equals that of a
Keras model with the same weights. Not in a checkpoint, hence assumed: ``tanh``
activations, no ``cell_clip``/``proj_clip``, and ``forget_bias`` 1.0 unless
``ModelOptions.tf1_forget_bias`` says otherwise.

If a checkpoint holds several RNNs (say ``encoder/rnn`` and ``decoder/rnn``), the one
at ``rnn`` is used, so ``--tf1-scope encoder/rnn=rnn`` picks one; renamed cells are
mapped the same way (``--tf1-scope encoder/my_cell=rnn/basic_lstm_cell``).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from transforms.models.checkpoints import checkpoint_prefix, object_graph
from transforms.models.description import (DenseLayer, GRULayer, LSTMLayer, ModelError,
                                           ModelLoader, ModelOptions, RecurrentStack)

_CELL = re.compile(r"^(?:(?P<rnn>.+?)/)?(?:multi_rnn_cell/cell_(?P<index>\d+)/)?"
                   r"(?P<cell>basic_lstm_cell|lstm_cell|gru_cell)/(?:gates/)?kernel$")
_HEADS = (("output/kernel", "output/bias"), ("softmax_w", "softmax_b"),
          ("dense/kernel", "dense/bias"), ("logits/kernel", "logits/bias"),
          ("fully_connected/weights", "fully_connected/biases"))
_SHOWN = 8  # variable names listed in a message or note; the rest are counted


class TF1CheckpointLoader(ModelLoader):
    """A TF1 ``tf.train.Saver`` checkpoint of RNN cells (see the module docstring)."""

    format_name = "tf1-checkpoint"

    def can_load(self, path: str) -> bool:
        prefix = checkpoint_prefix(path)
        return prefix is not None and object_graph(prefix) is None

    def load(self, path: str, options: ModelOptions) -> RecurrentStack:
        import tensorflow as tf

        prefix = checkpoint_prefix(path)
        reader = tf.train.load_checkpoint(prefix)
        return stack_from_tf1(reader.get_variable_to_shape_map(), reader.get_tensor,
                              options, f"{self.format_name}:{prefix}")


def stack_from_tf1(shapes: Mapping[str, Sequence[int]], read: Callable[[str], np.ndarray],
                   options: ModelOptions, source: str) -> RecurrentStack:
    """The stack held by a TF1 checkpoint's variables: ``shapes`` maps every variable
    name to its shape, ``read(name)`` returns its value."""
    variables = _Variables(_renamed(shapes, options.tf1_scopes, source), read, source)
    layers, width = [], None
    for scope, cell in _find_cells(variables.names, source):
        layer = (_gru(scope, variables, width) if cell == "gru_cell"
                 else _lstm(scope, variables, width, options.tf1_forget_bias))
        layers.append(layer)
        width = layer.output_dim
    found = [pair for pair in _HEADS if variables.has(pair[0])]
    if len(found) > 1 and found[0] != _HEADS[0]:
        raise ModelError(f"{source}: several output projections ("
                         f"{', '.join(kernel for kernel, _ in found)}); name the one to use "
                         "with --tf1-scope, e.g. --tf1-scope dense=output")
    head = ()
    if found:
        kernel_name, bias_name = found[0]
        kernel = variables.get(kernel_name)
        head = (DenseLayer(kernel, variables.get(bias_name) if variables.has(bias_name)
                           else np.zeros(kernel.shape[-1], np.float32)),)
    unused = variables.unused()
    notes = (f"variables not used: {_listing(unused)}",) if unused else ()
    return RecurrentStack(tuple(layers) + head, source=source, notes=notes)


class _Variables:
    """A checkpoint's variables by (renamed) name, remembering which were used."""

    def __init__(self, names: Mapping[str, str], read: Callable[[str], np.ndarray],
                 source: str):
        self.names, self.source = names, source
        self._read = read
        self._used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> np.ndarray:
        if name not in self.names:
            scope = name.rsplit("/", 1)[0]
            raise ModelError(f"{self.source}: missing variable {name} (the checkpoint has "
                             f"{_listing(n for n in self.names if n.startswith(scope + '/'))} "
                             f"under {scope})")
        self._used.add(name)
        return np.asarray(self._read(self.names[name]), np.float32)

    def unused(self) -> list[str]:
        return sorted(self.names[n] for n in self.names if n not in self._used)


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    if not names:
        return "none"
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" (and {more} more)" if more > 0 else "")


def _renamed(shapes: Mapping[str, Sequence[int]], scopes: Sequence[tuple[str, str]],
             source: str) -> dict[str, str]:
    """Variable name after the ``(old, new)`` prefix renames -> name in the checkpoint."""
    names: dict[str, str] = {}
    for original in shapes:
        name = original
        for old, new in scopes:
            if name == old or name.startswith(old + "/"):
                name = new + name[len(old):]
                break
        if name in names:
            raise ModelError(f"{source}: --tf1-scope maps both {names[name]} and "
                             f"{original} to {name}")
        names[name] = original
    return names


def _find_cells(names: Mapping[str, str], source: str) -> list[tuple[str, str]]:
    """``(scope, cell kind)`` of each layer of the one RNN to run, in stack order."""
    rnns: dict[str, dict[int, tuple[str, str]]] = {}
    for name in names:
        match = _CELL.match(name)
        if not match or name.endswith("/gates/kernel") != (match["cell"] == "gru_cell"):
            continue
        rnn, index = match["rnn"] or "", int(match["index"] or -1)
        scope = name.removesuffix("/gates/kernel").removesuffix("/kernel")
        rnns.setdefault(rnn, {})[index] = (scope, match["cell"])
    if not rnns:
        raise ModelError(
            f"{source}: no TF1 RNN cell found (variables named like "
            "rnn/basic_lstm_cell/kernel, rnn/lstm_cell/kernel, rnn/gru_cell/gates/kernel, "
            "or under rnn/multi_rnn_cell/cell_0/); the checkpoint has "
            f"{_listing(sorted(names.values()))}. If the cells were renamed, map them with "
            "--tf1-scope OLD=NEW, e.g. --tf1-scope encoder/my_cell=rnn/basic_lstm_cell")
    bidirectional = sorted(r for r in rnns if "bidirectional_rnn" in r.split("/"))
    if bidirectional:
        raise ModelError(f"{source}: the checkpoint holds a bidirectional RNN ("
                         f"{', '.join(bidirectional)}), which is not causal (its backward "
                         "half reads later steps first), so it cannot run on chunks as "
                         "they arrive")
    if len(rnns) > 1 and "rnn" not in rnns:
        raise ModelError(f"{source}: the checkpoint holds several RNNs ("
                         f"{', '.join(sorted(r or '(top level)' for r in rnns))}); pick one "
                         "with --tf1-scope SCOPE=rnn")
    layers = rnns["rnn" if len(rnns) > 1 else next(iter(rnns))]
    if -1 in layers and len(layers) > 1 or -1 not in layers and sorted(layers) != list(
            range(len(layers))):
        raise ModelError(f"{source}: the RNN's cells are not one cell or a MultiRNNCell "
                         f"cell_0, cell_1, ...: {', '.join(s for s, _ in layers.values())}")
    return [layers[index] for index in sorted(layers)]


def _split_rows(kernel: np.ndarray, recurrent_width: int, scope: str, width: int | None,
                source: str) -> tuple[np.ndarray, np.ndarray]:
    """A TF1 kernel over concat([inputs, h]) -> (input kernel, recurrent kernel)."""
    input_dim = kernel.shape[0] - recurrent_width
    if input_dim < 1 or width is not None and input_dim != width:
        raise ModelError(f"{source}: {scope}/kernel has {kernel.shape[0]} rows: "
                         f"{recurrent_width} for h leaves {input_dim} for the input, but "
                         f"the layer below gives {width if width is not None else 'at least 1'}")
    return kernel[:input_dim], kernel[input_dim:]


def _ijfo_to_ifco(matrix: np.ndarray, units: int) -> np.ndarray:
    """TF1's LSTM gate blocks i, j, f, o -> Keras' i, f, c (= j), o."""
    i, j, f, o = (matrix[..., k * units:(k + 1) * units] for k in range(4))
    return np.concatenate([i, f, j, o], axis=-1)


def _lstm(scope: str, variables: _Variables, width: int | None,
          forget_bias: float) -> LSTMLayer:
    if variables.has(f"{scope}/recurrent_kernel"):
        # Keras' own LSTM layer (tf.keras in a graph): another layout, which read as a
        # TF1 cell would compute something else without any error.
        raise ModelError(f"{variables.source}: {scope} holds a Keras LSTM layer's "
                         "variables (kernel, recurrent_kernel), not a TF1 cell's; save the "
                         "Keras model as a .keras file or with tf.train.Checkpoint instead")
    kernel, bias = variables.get(f"{scope}/kernel"), variables.get(f"{scope}/bias")
    if kernel.ndim != 2 or kernel.shape[1] % 4 or bias.shape != (kernel.shape[1],):
        raise ModelError(f"{variables.source}: {scope}: kernel {list(kernel.shape)} and "
                         f"bias {list(bias.shape)} are not an LSTM's [input + h, 4 * units], "
                         "[4 * units]")
    units = kernel.shape[1] // 4
    projection = (variables.get(f"{scope}/projection/kernel")
                  if variables.has(f"{scope}/projection/kernel") else None)
    peepholes = (np.stack([variables.get(f"{scope}/w_{gate}_diag") for gate in "ifo"])
                 if variables.has(f"{scope}/w_f_diag") else None)
    inputs, recurrent = _split_rows(
        kernel, units if projection is None else projection.shape[1], scope, width,
        variables.source)
    bias = _ijfo_to_ifco(bias, units)
    bias[units:2 * units] += np.float32(forget_bias)
    return LSTMLayer(_ijfo_to_ifco(inputs, units), _ijfo_to_ifco(recurrent, units), bias,
                     peepholes=peepholes, projection=projection)


def _gru(scope: str, variables: _Variables, width: int | None) -> GRULayer:
    gates, gate_bias = variables.get(f"{scope}/gates/kernel"), variables.get(f"{scope}/gates/bias")
    candidate = variables.get(f"{scope}/candidate/kernel")
    candidate_bias = variables.get(f"{scope}/candidate/bias")
    units = candidate.shape[-1]
    if gates.shape != (candidate.shape[0], 2 * units) or gate_bias.shape != (2 * units,):
        raise ModelError(f"{variables.source}: {scope}: gates/kernel {list(gates.shape)} "
                         f"does not fit candidate/kernel {list(candidate.shape)}")
    gate_inputs, gate_recurrent = _split_rows(gates, units, scope, width, variables.source)
    candidate_inputs, candidate_recurrent = _split_rows(candidate, units, scope, width,
                                                        variables.source)

    def z_r_h(gate_part: np.ndarray, candidate_part: np.ndarray) -> np.ndarray:
        # TF1 orders its gates r, u; u is Keras' update gate z.
        return np.concatenate([gate_part[..., units:], gate_part[..., :units],
                               candidate_part], axis=-1)

    return GRULayer(z_r_h(gate_inputs, candidate_inputs),
                    z_r_h(gate_recurrent, candidate_recurrent),
                    z_r_h(gate_bias, candidate_bias), reset_after=False)
