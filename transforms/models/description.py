"""What a model is to seqcarry, whatever file it came from: a :class:`RecurrentStack`
(an optional input layer, ``Embedding`` or ``Masking``, recurrent layers, then an
optional per-step head of dense layers), its fingerprint, and the :class:`ModelLoader`
interface every format implements (one module each in :mod:`transforms.models`).

Each loader normalizes weights into one canonical layout per layer kind (Keras' layout
and gate order), so the compute kernel (:mod:`transforms.kernel`) only ever sees this
description and a new format is one more :class:`ModelLoader`.

The **fingerprint** is the sha256 of :meth:`RecurrentStack.describe` (as sorted JSON)
followed by every weight as little-endian float32 in that canonical layout. It depends
only on what is computed, not on the file it came from: the same weights read from a
TF1 checkpoint, a ``.keras`` file or a ``tf.train.Checkpoint`` give the same
fingerprint, so carried state written under one continues under the other. A
SavedModel is a black box whose weights seqcarry cannot put in that layout: its
fingerprint covers its step signature and a digest of its variables instead, so its
state continues only under a SavedModel with the same signature and variables.

No Beam and no TensorFlow here.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
from typing import Any, Callable, Sequence

import numpy as np

# Activation names the kernel implements, with Keras 3's meaning of each.
ACTIVATIONS = ("linear", "tanh", "sigmoid", "hard_sigmoid", "relu", "softmax", "elu",
               "softplus", "swish", "silu", "gelu")
STEP_SIGNATURE = "step"  # the SavedModel signature seqcarry runs (see StepFunctionLayer)


class ModelError(ValueError):
    """The model file cannot be used: unknown format, unsupported layer, bad weights."""


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What auto-detection cannot see in a model location. Picklable: it travels with
    the pipeline to every worker, which loads the model itself.

    ``architecture``: a ``.keras`` file or a Keras JSON config (``model.to_json()``)
    giving the architecture of a ``tf.train.Checkpoint``.
    ``tf1_scopes``: ``(old, new)`` prefixes of TF1 variable names, applied before
    detection, for scopes renamed from the defaults (see
    :mod:`transforms.models.tf1_checkpoint`).
    ``tf1_forget_bias``: the ``forget_bias`` the TF1 LSTM cells were built with (not
    stored in the checkpoint; TF1's default is 1.0).
    """
    architecture: str | None = None
    tf1_scopes: tuple[tuple[str, str], ...] = ()
    tf1_forget_bias: float = 1.0

    @classmethod
    def from_arguments(cls, architecture: str | None = None, tf1_scopes: Sequence[str] = (),
                       tf1_forget_bias: float = 1.0) -> "ModelOptions":
        """From command-line values; each of ``tf1_scopes`` is ``OLD=NEW``."""
        pairs = []
        for mapping in tf1_scopes:
            old, sep, new = mapping.partition("=")
            if not sep or not old.strip("/") or not new.strip("/"):
                raise ModelError(f"--tf1-scope {mapping!r} must be OLD=NEW, e.g. "
                                 "my_model/encoder=rnn")
            pairs.append((old.strip("/"), new.strip("/")))
        return cls(architecture, tuple(pairs), float(tf1_forget_bias))


# --- layers, in the canonical layout ----------------------------------------------

class _Layer:
    """What every layer tells the stack: widths, weights and their expected shapes."""
    kind = ""
    state_parts: tuple[str, ...] = ()  # none: a per-step layer

    def state_names(self, position: int) -> tuple[str, ...]:
        """Names of this layer's state parts as the model's ``position``-th layer."""
        return tuple(f"layer{position}_{part}" for part in self.state_parts)

    def weights(self) -> tuple[np.ndarray, ...]:
        return ()

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ()

    @property
    def input_dims(self) -> tuple[int, ...]:
        """The width of each value the layer reads (one, but for a merge)."""
        return (self.input_dim,)


class _KernelLayer(_Layer):
    """A layer whose ``kernel`` [input_dim, ...] reads its input."""

    @property
    def input_dim(self) -> int:
        return int(self.kernel.shape[0])


class _RecurrentLayer(_Layer):
    """A layer that carries state from step to step."""


class _HiddenStateLayer(_RecurrentLayer, _KernelLayer):
    """A recurrent layer whose only state is its output h (GRU, SimpleRNN)."""
    state_parts = ("h",)

    @property
    def units(self) -> int:
        return int(self.recurrent_kernel.shape[0])

    @property
    def output_dim(self) -> int:
        return self.units

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return (self.units,)


@dataclasses.dataclass(frozen=True, eq=False)
class LSTMLayer(_RecurrentLayer, _KernelLayer):
    """One LSTM layer in Keras' layout: gates ordered input, forget, cell, output.

    kernel [input_dim, 4 * units], recurrent_kernel [output_dim, 4 * units],
    bias [4 * units] (any TF1 ``forget_bias`` already added to the forget gate's part).
    Optional, from TF1 ``LSTMCell``: ``peepholes`` [3, units], the diagonal weights
    of c in the input, forget and output gates (``w_i_diag``, ``w_f_diag``,
    ``w_o_diag``); ``projection`` [units, output_dim]: h = (o * act(c)) @ projection,
    so h has ``output_dim`` values and c ``units``.
    """
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    peepholes: np.ndarray | None = None
    projection: np.ndarray | None = None

    kind = "lstm"
    state_parts = ("h", "c")

    @property
    def units(self) -> int:
        return int(self.bias.shape[0]) // 4

    @property
    def output_dim(self) -> int:
        return self.units if self.projection is None else int(self.projection.shape[1])

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return (self.output_dim, self.units)

    def config(self) -> dict:
        config = {"kind": self.kind, "units": self.units, "input_dim": self.input_dim,
                  "activation": self.activation,
                  "recurrent_activation": self.recurrent_activation}
        # Only when present: a plain LSTM's description (and fingerprint) stays as it was.
        if self.peepholes is not None:
            config["peepholes"] = True
        if self.projection is not None:
            config["projection"] = self.output_dim
        return config

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.kernel, self.recurrent_kernel, self.bias) + tuple(
            w for w in (self.peepholes, self.projection) if w is not None)

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        units = self.units
        shapes = [(self.input_dim, 4 * units), (self.output_dim, 4 * units), (4 * units,)]
        if self.peepholes is not None:
            shapes.append((3, units))
        if self.projection is not None:
            shapes.append((units, self.output_dim))
        return tuple(shapes)


@dataclasses.dataclass(frozen=True, eq=False)
class GRULayer(_HiddenStateLayer):
    """One GRU layer in Keras' layout: gates ordered update (z), reset (r), candidate.

    kernel [input_dim, 3 * units], recurrent_kernel [units, 3 * units]; bias [3 * units],
    or [2, 3 * units] (input and recurrent biases) when ``reset_after``: the reset
    gate multiplies ``h @ recurrent_kernel`` (Keras' default) instead of h.
    """
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"
    reset_after: bool = True

    kind = "gru"

    def config(self) -> dict:
        return {"kind": self.kind, "units": self.units, "input_dim": self.input_dim,
                "activation": self.activation,
                "recurrent_activation": self.recurrent_activation,
                "reset_after": self.reset_after}

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.kernel, self.recurrent_kernel, self.bias)

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        gates = 3 * self.units
        return ((self.input_dim, gates), (self.units, gates),
                (2, gates) if self.reset_after else (gates,))


@dataclasses.dataclass(frozen=True, eq=False)
class SimpleRNNLayer(_HiddenStateLayer):
    """One fully-connected recurrent layer (Keras ``SimpleRNN``):
    ``h = activation(x @ kernel + h @ recurrent_kernel + bias)``.

    kernel [input_dim, units], recurrent_kernel [units, units], bias [units].
    """
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray
    activation: str = "tanh"

    kind = "simple_rnn"

    def config(self) -> dict:
        return {"kind": self.kind, "units": self.units, "input_dim": self.input_dim,
                "activation": self.activation}

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.kernel, self.recurrent_kernel, self.bias)

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.input_dim, self.units), (self.units, self.units), (self.units,))


@dataclasses.dataclass(frozen=True, eq=False)
class StepFunctionLayer(_RecurrentLayer):
    """A black-box recurrent step: a SavedModel's ``step`` signature.

    ``function(x=[B, input_dim], **{state: [B, size]})`` returns ``outputs``
    [B, output_dim] and the new value of each state. The kernel cannot see its
    weights, so it calls it once per time step (inside the compiled loop) and does
    the masking itself: on a padded step the states stay unchanged. Its state parts
    are named by the signature (``layer0_h``, ...) and carried as they are.
    ``variables_sha256`` stands in for the weights in the fingerprint.
    """
    function: Callable[..., dict]
    input_dim: int
    output_dim: int
    names: tuple[str, ...]
    state_sizes: tuple[int, ...]
    variables_sha256: str
    owner: Any = None  # the loaded SavedModel: keeps the function's variables alive

    kind = "step_function"

    @property
    def state_parts(self) -> tuple[str, ...]:
        return self.names

    def state_names(self, position: int) -> tuple[str, ...]:
        return self.names

    def config(self) -> dict:
        return {"kind": self.kind, "input_dim": self.input_dim,
                "output_dim": self.output_dim,
                "states": dict(zip(self.names, self.state_sizes)),
                "variables_sha256": self.variables_sha256}


@dataclasses.dataclass(frozen=True, eq=False)
class DenseLayer(_KernelLayer):
    """A dense layer applied to every step: kernel [input_dim, units], bias [units]."""
    kernel: np.ndarray
    bias: np.ndarray
    activation: str = "linear"

    kind = "dense"

    @property
    def units(self) -> int:
        return int(self.kernel.shape[1])

    @property
    def output_dim(self) -> int:
        return self.units

    def config(self) -> dict:
        return {"kind": self.kind, "units": self.units, "input_dim": self.input_dim,
                "activation": self.activation}

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.kernel, self.bias)

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.input_dim, self.units), (self.units,))


@dataclasses.dataclass(frozen=True, eq=False)
class CausalConvLayer(_RecurrentLayer):
    """Keras ``Conv1D(padding="causal")``: the output at step t reads the inputs at
    t - (kernel_size - 1 - j) * dilation for j < kernel_size (zeros before the
    sequence starts). Its state is the window of its last
    ``(kernel_size - 1) * dilation`` inputs, oldest first, flattened; so a chunk's
    first steps see the previous chunk's last inputs, as the whole sequence would.

    kernel [kernel_size, input_dim, filters], bias [filters]. A kernel of one step
    carries nothing (no state part).
    """
    kernel: np.ndarray
    bias: np.ndarray
    dilation: int = 1
    activation: str = "linear"

    kind = "conv1d"

    @property
    def kernel_size(self) -> int:
        return int(self.kernel.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.kernel.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.kernel.shape[2])

    @property
    def window(self) -> int:
        """How many past inputs the layer reads besides the current one."""
        return (self.kernel_size - 1) * self.dilation

    @property
    def state_parts(self) -> tuple[str, ...]:
        return ("window",) if self.window else ()

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return (self.window * self.input_dim,) if self.window else ()

    def config(self) -> dict:
        return {"kind": self.kind, "kernel_size": self.kernel_size,
                "dilation": self.dilation, "filters": self.output_dim,
                "input_dim": self.input_dim, "activation": self.activation}

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.kernel, self.bias)

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.kernel_size, self.input_dim, self.output_dim), (self.output_dim,))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerNormLayer(_Layer):
    """Keras ``LayerNormalization`` over the features of each step: with
    ``rms_scaling``, x / rms(x - mean) * gamma; else (x - mean) / std * gamma + beta
    (std = sqrt(variance + epsilon)). gamma and beta [input_dim] (ones and zeros when
    the layer has no ``scale`` or ``center``)."""
    gamma: np.ndarray
    beta: np.ndarray
    epsilon: float = 1e-3
    rms_scaling: bool = False

    kind = "layer_norm"

    @property
    def input_dim(self) -> int:
        return int(self.gamma.shape[0])

    @property
    def output_dim(self) -> int:
        return self.input_dim

    def config(self) -> dict:
        return {"kind": self.kind, "input_dim": self.input_dim, "epsilon": self.epsilon,
                "rms_scaling": self.rms_scaling}

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.gamma, self.beta)

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.input_dim,), (self.input_dim,))


@dataclasses.dataclass(frozen=True, eq=False)
class BatchNormLayer(_Layer):
    """Keras ``BatchNormalization`` at inference, over the features of each step:
    (x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta, all [input_dim]
    (gamma and beta ones and zeros when the layer has no ``scale`` or ``center``)."""
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    epsilon: float = 1e-3

    kind = "batch_norm"

    @property
    def input_dim(self) -> int:
        return int(self.moving_mean.shape[0])

    @property
    def output_dim(self) -> int:
        return self.input_dim

    def config(self) -> dict:
        return {"kind": self.kind, "input_dim": self.input_dim, "epsilon": self.epsilon}

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.moving_mean, self.moving_variance, self.gamma, self.beta)

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.input_dim,),) * 4


@dataclasses.dataclass(frozen=True, eq=False)
class ActivationLayer(_Layer):
    """An activation applied to every step (Keras ``Activation``)."""
    activation: str
    input_dim: int

    kind = "activation"

    @property
    def output_dim(self) -> int:
        return self.input_dim

    def config(self) -> dict:
        return {"kind": self.kind, "input_dim": self.input_dim,
                "activation": self.activation}


MERGE_OPERATIONS = ("add", "subtract", "multiply", "average", "maximum", "minimum",
                    "concatenate")


@dataclasses.dataclass(frozen=True, eq=False)
class MergeLayer(_Layer):
    """Several values of the same step combined (Keras ``Add``, ``Subtract``,
    ``Multiply``, ``Average``, ``Maximum``, ``Minimum``, ``Concatenate`` on the
    feature axis): skip connections of a functional model."""
    operation: str
    widths: tuple[int, ...]

    kind = "merge"

    @property
    def input_dims(self) -> tuple[int, ...]:
        return self.widths

    @property
    def input_dim(self) -> int:
        return self.widths[0]

    @property
    def output_dim(self) -> int:
        return sum(self.input_dims) if self.operation == "concatenate" else self.input_dim

    def config(self) -> dict:
        return {"kind": self.kind, "operation": self.operation,
                "input_dims": list(self.widths)}


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingLayer(_Layer):
    """Token ids to vectors, before the first recurrent layer (Keras ``Embedding``).

    The chunks' features then have width 1: one token id per step, a whole number in
    [0, vocabulary) (float32 holds ids exactly up to 2**24); other values are
    rejected when read. With ``mask_zero``, steps with id 0 are masked as Keras does:
    every layer's state stays unchanged and the step repeats the previous output.
    """
    embeddings: np.ndarray
    mask_zero: bool = False

    kind = "embedding"
    input_dim = 1

    @property
    def vocabulary(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def config(self) -> dict:
        return {"kind": self.kind, "vocabulary": self.vocabulary,
                "output_dim": self.output_dim, "mask_zero": self.mask_zero}

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.embeddings,)

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.vocabulary, self.output_dim),)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskingLayer(_Layer):
    """Keras ``Masking``: a step whose features all equal ``mask_value`` leaves every
    layer's state unchanged and repeats the previous output (Keras' semantics, which
    chunking does not change, since the previous output is the carried h); its
    features read as zeros (what a skip connection from the input sees)."""
    mask_value: float
    input_dim: int

    kind = "masking"

    @property
    def output_dim(self) -> int:
        return self.input_dim

    def config(self) -> dict:
        return {"kind": self.kind, "mask_value": self.mask_value}


@dataclasses.dataclass(frozen=True, eq=False)
class RecurrentStack:
    """A model as seqcarry runs it: an optional input layer, then ``layers`` (recurrent,
    causal-convolution and per-step ones), each reading the values ``inputs`` names,
    computed step by step; the last layer's value is the model's output.

    Values are numbered: 0 is the model's input (after the input layer), k + 1 the
    output of ``layers[k]``. ``inputs[k]`` lists the values ``layers[k]`` reads (more
    than one only for a merge); every layer reads only earlier values, so the order
    of ``layers`` computes them. ``inputs`` left empty means a chain: each layer reads
    the one before it.

    ``source`` is ``format:path``, for messages; ``notes`` are what a loader wants
    people to know (e.g. checkpoint variables it did not use), shown by
    ``seqcarry inspect-model``. ``sequence_output`` is False for a model that gives
    one output for a whole sequence (a classifier: its last recurrent layer has
    Keras' ``return_sequences=False``): the kernel still computes its output at every
    step (what it would say if the sequence ended there), and a run keeps each
    chunk's last one unless told otherwise (``--outputs-at``). None of these three is
    part of the fingerprint: they do not change what is computed.
    """
    layers: tuple[_Layer, ...]
    inputs: tuple[tuple[int, ...], ...] = ()
    source: str = ""
    input_layer: EmbeddingLayer | MaskingLayer | None = None
    notes: tuple[str, ...] = ()
    sequence_output: bool = True

    def __post_init__(self) -> None:
        name = self.source or "model"
        if not self.inputs:
            object.__setattr__(self, "inputs", tuple((k,) for k in range(len(self.layers))))
        if len(self.inputs) != len(self.layers):
            raise ModelError(f"{name}: {len(self.layers)} layers but {len(self.inputs)} "
                             "input lists")
        if not self.recurrent:
            raise ModelError(f"{name}: no recurrent layer found (nor a causal convolution "
                             "wider than one step): there is no state to carry")
        widths = [(self.input_layer or self.layers[0]).input_dim]
        if self.input_layer:
            self._check_layer("input", self.input_layer, (widths[0],))
            widths = [self.input_layer.output_dim]
        for position, (layer, reads) in enumerate(zip(self.layers, self.inputs)):
            if not reads or any(not 0 <= value <= position for value in reads):
                raise ModelError(f"{name}: layer {position} ({layer.kind}) reads values "
                                 f"{list(reads)}; only earlier ones (0..{position}) exist")
            self._check_layer(str(position), layer, tuple(widths[value] for value in reads))
            widths.append(layer.output_dim)
        if any(isinstance(layer, StepFunctionLayer) for layer in self.layers) and (
                len(self.layers) > 1 or self.input_layer):
            raise ModelError(f"{name}: a step function is a whole model on its own")
        if masks_inputs(self.input_layer) and any(
                isinstance(layer, CausalConvLayer) for layer in self.layers):
            raise ModelError(f"{name}: a causal convolution after an input mask (Masking, "
                             "Embedding(mask_zero=True)) is not supported: Keras' Conv1D "
                             "ignores the mask, so masked steps would still fill its window")

    def _check_layer(self, position: str, layer: _Layer, widths: tuple[int, ...]) -> None:
        name = self.source or "model"
        if widths != layer.input_dims:
            received = widths[0] if len(widths) == 1 else list(widths)
            expected = layer.input_dim if len(widths) == 1 else list(layer.input_dims)
            raise ModelError(f"{name}: layer {position} ({layer.kind}) takes width "
                             f"{expected}, but receives {received}")
        if isinstance(layer, MergeLayer) and (
                layer.operation not in MERGE_OPERATIONS or layer.operation != "concatenate"
                and len(set(widths)) != 1):
            raise ModelError(f"{name}: layer {position} ({layer.operation}) cannot merge "
                             f"widths {list(widths)}")
        shapes = tuple(tuple(w.shape) for w in layer.weights())
        if shapes != layer.expected_shapes():
            raise ModelError(f"{name}: layer {position} ({layer.kind}) has weights of "
                             f"shapes {list(shapes)}; expected "
                             f"{list(layer.expected_shapes())}")
        for attribute in ("activation", "recurrent_activation"):
            activation = getattr(layer, attribute, "linear")
            if activation not in ACTIVATIONS:
                raise ModelError(f"{name}: layer {position} uses {attribute}="
                                 f"{activation!r}; supported: {', '.join(ACTIVATIONS)}")

    @property
    def recurrent(self) -> tuple[_RecurrentLayer, ...]:
        """The layers that carry state, in order (recurrent layers, and causal
        convolutions wider than one step)."""
        return tuple(layer for layer in self.layers if layer.state_parts)

    @property
    def is_chain(self) -> bool:
        """Whether each layer reads only the one before it."""
        return self.inputs == tuple((k,) for k in range(len(self.layers)))

    @property
    def format(self) -> str:
        return self.source.partition(":")[0]

    @property
    def input_dim(self) -> int:
        return (self.input_layer or self.layers[0]).input_dim

    @property
    def output_dim(self) -> int:
        return self.layers[-1].output_dim

    @property
    def vocabulary(self) -> int | None:
        """With an embedding input, the token ids a feature may hold: [0, vocabulary)."""
        return self.input_layer.vocabulary if isinstance(
            self.input_layer, EmbeddingLayer) else None

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the carried state's parts, e.g. ``layer0_h``, ``layer0_c``, ``layer1_h``
        (numbered by the layer's position)."""
        return tuple(name for position, layer in enumerate(self.layers)
                     for name in layer.state_names(position))

    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Size of each state part (an LSTM with a projection has h smaller than c)."""
        return tuple(size for layer in self.recurrent for size in layer.state_sizes)

    def zero_state(self) -> tuple[np.ndarray, ...]:
        """The state a sequence starts from."""
        return tuple(np.zeros(size, np.float32) for size in self.state_sizes)

    def describe(self) -> dict:
        """Architecture as plain data (also what the fingerprint hashes, with the weights).

        A chain of recurrent layers then dense ones is described as it always was
        (``recurrent`` and ``head``), so the fingerprints of such models, and the state
        carried under them, stay valid."""
        recurrent = len(self.recurrent)
        if self.is_chain and all(isinstance(layer, (LSTMLayer, GRULayer, SimpleRNNLayer,
                                                    StepFunctionLayer))
                                 for layer in self.layers[:recurrent]) and all(
                isinstance(layer, DenseLayer) for layer in self.layers[recurrent:]):
            described = {"recurrent": [layer.config() for layer in self.layers[:recurrent]],
                         "head": [layer.config() for layer in self.layers[recurrent:]]}
        else:
            described = {"layers": [layer.config() for layer in self.layers],
                         "inputs": [list(reads) for reads in self.inputs]}
        if self.input_layer:  # absent otherwise, so older fingerprints stay valid
            described["input"] = self.input_layer.config()
        return described

    def summary(self) -> dict:
        """What ``seqcarry inspect-model`` shows: format, layers, widths, state, fingerprint."""
        entries = [{"position": "input", **self.input_layer.config(),
                    "input_dim": self.input_layer.input_dim,
                    "output_dim": self.input_layer.output_dim}] if self.input_layer else []
        for position, (layer, reads) in enumerate(zip(self.layers, self.inputs)):
            entry = {"position": str(position), **layer.config(),
                     "input_dim": layer.input_dim, "output_dim": layer.output_dim}
            if not self.is_chain:
                entry["reads"] = ["input" if value == 0 else f"layer {value - 1}"
                                  for value in reads]
            entries.append(entry)
        states = dict(zip(self.state_names, self.state_sizes))
        return {
            "format": self.format, "source": self.source.partition(":")[2],
            "input_width": self.input_dim, "output_width": self.output_dim,
            "layers": entries,
            "state_parts": states,
            "state_floats_per_sequence": sum(states.values()),
            "sequence_output": self.sequence_output,
            "fingerprint": self.fingerprint, "notes": list(self.notes)}

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of :meth:`describe` and of every weight as float32 little-endian, in
        the canonical layout (see the module docstring): the same for the same
        computation from any format."""
        digest = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for layer in ((self.input_layer,) if self.input_layer else ()) + self.layers:
            for weight in layer.weights():
                digest.update(np.ascontiguousarray(weight, dtype="<f4").tobytes())
        return "sha256:" + digest.hexdigest()


def masks_inputs(input_layer: EmbeddingLayer | MaskingLayer | None) -> bool:
    """Whether the input layer masks steps in the middle of a sequence (``Masking``,
    ``Embedding(mask_zero=True)``)."""
    return isinstance(input_layer, MaskingLayer) or bool(
        isinstance(input_layer, EmbeddingLayer) and input_layer.mask_zero)


class ModelLoader(abc.ABC):
    """Reads one model format into a :class:`RecurrentStack`: the whole interface of a
    format, so the registry (:func:`transforms.models.load_model`) can try each in turn."""

    format_name: str = ""

    @abc.abstractmethod
    def can_load(self, path: str) -> bool:
        """Whether the local ``path`` looks like this loader's format."""

    @abc.abstractmethod
    def load(self, path: str, options: ModelOptions) -> RecurrentStack:
        """Load ``path``; raise :class:`ModelError` with a clear message when it cannot."""


