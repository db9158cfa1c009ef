"""Models as a plain description of a recurrent stack, loaders that produce it, and
the model fingerprint.

Every model format is loaded into the same :class:`RecurrentStack`: an optional input
layer (``Embedding`` or ``Masking``), recurrent layers, then an optional per-step head
of dense layers. Each loader normalizes weights into one canonical layout per layer
kind (Keras' layout and gate order), so the compute kernel (:mod:`transforms.kernel`)
only ever sees this description and a new format is one more :class:`ModelLoader`:

========================  ===================================================
format                    what ``--model`` points at
========================  ===================================================
``keras``                 a Keras 3 ``.keras`` file
``tf-checkpoint``         a ``tf.train.Checkpoint`` of a Keras model (prefix), with
                          the architecture given by ``ModelOptions.architecture``
``savedmodel``            a SavedModel directory with a ``step`` signature (a black
                          box run one step at a time; see :class:`StepFunctionLayer`)
``tf1-checkpoint``        a ``tf.train.Saver`` checkpoint (prefix) of TF1 RNN cells
                          (see :mod:`transforms.tf1`)
========================  ===================================================

The **fingerprint** is the sha256 of :meth:`RecurrentStack.describe` (as sorted JSON)
followed by every weight as little-endian float32 in that canonical layout. It depends
only on what is computed, not on the file it came from: the same weights read from a
TF1 checkpoint, a ``.keras`` file or a ``tf.train.Checkpoint`` give the same
fingerprint, so carried state written under one continues under the other. A
SavedModel is a black box whose weights seqcarry cannot put in that layout: its
fingerprint covers its step signature and a digest of its variables instead, so its
state continues only under a SavedModel with the same signature and variables.

No Beam here.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

import storage

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
    detection, for scopes renamed from the defaults (see :mod:`transforms.tf1`).
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

    def weights(self) -> tuple[np.ndarray, ...]:
        return ()

    def expected_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ()


class _KernelLayer(_Layer):
    """A layer whose ``kernel`` [input_dim, ...] reads its input."""

    @property
    def input_dim(self) -> int:
        return int(self.kernel.shape[0])


class _RecurrentLayer(_Layer):
    state_parts: tuple[str, ...] = ()

    def state_names(self, index: int) -> tuple[str, ...]:
        """Names of this layer's state parts as the ``index``-th recurrent layer."""
        return tuple(f"layer{index}_{part}" for part in self.state_parts)


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
class GRULayer(_RecurrentLayer, _KernelLayer):
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

    def state_names(self, index: int) -> tuple[str, ...]:
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
    chunking does not change, since the previous output is the carried h)."""
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
    """A model as seqcarry runs it: an optional input layer, recurrent layers, then an
    optional per-step head.

    ``source`` is ``format:path``, for messages; ``notes`` are what a loader wants
    people to know (e.g. checkpoint variables it did not use), shown by
    ``seqcarry inspect-model``. Neither is part of the fingerprint.
    """
    recurrent: tuple[_RecurrentLayer, ...]
    head: tuple[DenseLayer, ...] = ()
    source: str = ""
    input_layer: EmbeddingLayer | MaskingLayer | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = self.source or "model"
        if not self.recurrent:
            raise ModelError(f"{name}: no recurrent layer found")
        layers = ((self.input_layer,) if self.input_layer else ()) + self.layers
        width = layers[0].input_dim
        for position, layer in enumerate(layers):
            if layer.input_dim != width:
                raise ModelError(f"{name}: layer {position} ({layer.kind}) takes width "
                                 f"{layer.input_dim}, but receives {width}")
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
            width = layer.output_dim
        if any(isinstance(layer, StepFunctionLayer) for layer in self.recurrent) and (
                len(self.recurrent) > 1 or self.head or self.input_layer):
            raise ModelError(f"{name}: a step function is a whole model on its own")

    @property
    def layers(self) -> tuple[_Layer, ...]:
        """Recurrent layers and head, in order (the input layer aside)."""
        return self.recurrent + self.head

    @property
    def format(self) -> str:
        return self.source.partition(":")[0]

    @property
    def input_dim(self) -> int:
        return (self.input_layer or self.recurrent[0]).input_dim

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
        """Names of the carried state's parts, e.g. ``layer0_h``, ``layer0_c``, ``layer1_h``."""
        return tuple(name for index, layer in enumerate(self.recurrent)
                     for name in layer.state_names(index))

    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Size of each state part (an LSTM with a projection has h smaller than c)."""
        return tuple(size for layer in self.recurrent for size in layer.state_sizes)

    def zero_state(self) -> tuple[np.ndarray, ...]:
        """The state a sequence starts from."""
        return tuple(np.zeros(size, np.float32) for size in self.state_sizes)

    def describe(self) -> dict:
        """Architecture as plain data (also what the fingerprint hashes, with the weights)."""
        described = {"recurrent": [layer.config() for layer in self.recurrent],
                     "head": [layer.config() for layer in self.head]}
        if self.input_layer:  # absent otherwise, so older fingerprints stay valid
            described["input"] = self.input_layer.config()
        return described

    def summary(self) -> dict:
        """What ``seqcarry inspect-model`` shows: format, layers, widths, state, fingerprint."""
        layers = ((("input", self.input_layer),) if self.input_layer else ()) + tuple(
            (str(index), layer) for index, layer in enumerate(self.recurrent)) + tuple(
            ("head", layer) for layer in self.head)
        states = dict(zip(self.state_names, self.state_sizes))
        return {
            "format": self.format, "source": self.source.partition(":")[2],
            "input_width": self.input_dim, "output_width": self.output_dim,
            "layers": [{"position": position, **layer.config(), "input_dim": layer.input_dim,
                        "output_dim": layer.output_dim} for position, layer in layers],
            "state_parts": states,
            "state_floats_per_sequence": sum(states.values()),
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


# --- loaders -------------------------------------------------------------------------

class ModelLoader(abc.ABC):
    """Reads one model format into a :class:`RecurrentStack`."""

    format_name: str = ""

    @abc.abstractmethod
    def can_load(self, path: str) -> bool:
        """Whether the local ``path`` looks like this loader's format."""

    @abc.abstractmethod
    def load(self, path: str, options: ModelOptions) -> RecurrentStack:
        """Load ``path``; raise :class:`ModelError` with a clear message when it cannot."""


# Layers whose output at a step depends on later steps: a chunk's later steps have not
# arrived when it is computed.
_NON_CAUSAL = ("Bidirectional", "Attention", "AdditiveAttention", "MultiHeadAttention",
               "GroupedQueryAttention", "GlobalAveragePooling1D", "GlobalMaxPooling1D")
_IDENTITY_AT_INFERENCE = ("InputLayer", "Dropout", "GaussianNoise", "GaussianDropout")
_KERAS_SUPPORTED = ("stacked LSTM/GRU(return_sequences=True) layers, optionally after one "
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
        elif kind in ("LSTM", "GRU"):
            if head:
                raise ModelError(f"{source}: {kind} layer {layer.name!r} after a Dense "
                                 "layer; dense layers are only supported as a per-step head")
            if not config["return_sequences"] or config["go_backwards"]:
                raise ModelError(f"{source}: {kind} layer {layer.name!r} must have "
                                 "return_sequences=True and go_backwards=False")
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


def masks_inputs(input_layer: EmbeddingLayer | MaskingLayer | None) -> bool:
    """Whether the input layer masks steps in the middle of a sequence (``Masking``,
    ``Embedding(mask_zero=True)``)."""
    return isinstance(input_layer, MaskingLayer) or bool(
        isinstance(input_layer, EmbeddingLayer) and input_layer.mask_zero)


def _keras_recurrent(kind: str, layer: Any, config: dict) -> _RecurrentLayer:
    kernel, recurrent_kernel, *bias = layer.get_weights()
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
        return stack_from_keras(_read_keras(path), f"keras:{path}")


def _read_keras(path: str) -> Any:
    """A ``.keras`` file, or a JSON config (``model.to_json()``) as an unweighted model."""
    import keras  # deferred: importing Keras costs seconds

    try:
        if path.endswith(".json"):
            with open(path) as handle:
                return keras.models.model_from_json(handle.read())
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelError(f"{path}: cannot be read as a Keras model: {error}") from error


def checkpoint_prefix(path: str) -> str | None:
    """The TF checkpoint at ``path`` (a prefix with ``.index`` beside it, or a
    directory with a ``checkpoint`` file naming the latest), or None."""
    if os.path.isfile(path + ".index"):
        return path
    if os.path.isfile(os.path.join(path, "checkpoint")):
        import tensorflow as tf

        latest = tf.train.get_checkpoint_state(path).model_checkpoint_path
        # TF1's Saver records an absolute path by default, wrong once the directory
        # is copied (from gs://, or to another machine): look beside the file.
        prefix = os.path.join(path, os.path.basename(latest))
        return prefix if os.path.isfile(prefix + ".index") else None
    return None


def _object_graph(prefix: str) -> Any | None:
    """The object graph of a ``tf.train.Checkpoint`` (None for a TF1 ``Saver`` one)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(prefix)
    if not reader.has_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"):
        return None
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph


class KerasCheckpointLoader(ModelLoader):
    """A ``tf.train.Checkpoint(model=keras_model)`` written by ``write``/``save``: the
    weights come from it, the architecture from ``ModelOptions.architecture``."""

    format_name = "tf-checkpoint"

    def can_load(self, path: str) -> bool:
        prefix = checkpoint_prefix(path)
        return prefix is not None and _object_graph(prefix) is not None

    def load(self, path: str, options: ModelOptions) -> RecurrentStack:
        import tensorflow as tf

        prefix = checkpoint_prefix(path)
        if not options.architecture:
            raise ModelError(f"{prefix} is a tf.train.Checkpoint, which holds weights but "
                             "not the architecture: pass --model-architecture (a .keras "
                             "file or a JSON file of model.to_json())")
        model = _read_keras(storage.local_copy(options.architecture))
        children = [child.local_name for child in _object_graph(prefix).nodes[0].children
                    if child.local_name not in ("save_counter", "optimizer")]
        root = "model" if "model" in children else children[0] if len(children) == 1 else None
        if root is None:
            raise ModelError(f"{prefix}: cannot tell which of {children} is the model; "
                             "save it as tf.train.Checkpoint(model=...)")
        try:
            status = tf.train.Checkpoint(**{root: model}).read(prefix)
            status.assert_existing_objects_matched()
        except AssertionError as error:
            missing = re.findall(r"path=(\S+),", str(error))
            raise ModelError(
                f"{prefix}: missing variable(s) of the architecture "
                f"{options.architecture}: {', '.join(missing) or error}") from None
        except ValueError as error:  # a shape differs
            raise ModelError(f"{prefix} does not fit the architecture "
                             f"{options.architecture}: {error}") from None
        status.expect_partial()  # optimizer slots and counters are not needed
        return stack_from_keras(model, f"{self.format_name}:{prefix}")


class TF1CheckpointLoader(ModelLoader):
    """A TF1 ``tf.train.Saver`` checkpoint of RNN cells (see :mod:`transforms.tf1`)."""

    format_name = "tf1-checkpoint"

    def can_load(self, path: str) -> bool:
        prefix = checkpoint_prefix(path)
        return prefix is not None and _object_graph(prefix) is None

    def load(self, path: str, options: ModelOptions) -> RecurrentStack:
        import tensorflow as tf
        from transforms.tf1 import stack_from_tf1

        prefix = checkpoint_prefix(path)
        reader = tf.train.load_checkpoint(prefix)
        return stack_from_tf1(reader.get_variable_to_shape_map(), reader.get_tensor,
                              options, f"{self.format_name}:{prefix}")


class SavedModelLoader(ModelLoader):
    """A SavedModel directory exposing a ``step`` signature (README, "SavedModel"):

    inputs ``x`` float32 [batch, input_dim] and one float32 [batch, size] tensor per
    state part, named ``layer<K>_<part>`` (e.g. ``layer0_h``, ``layer0_c``); outputs
    ``outputs`` float32 [batch, output_dim] and the new value of every state part,
    under the same names. One call is one time step; the states it receives start as
    zeros. :func:`transforms.export.export_step_savedmodel` writes one from Keras.
    """

    format_name = "savedmodel"

    def can_load(self, path: str) -> bool:
        return os.path.isfile(os.path.join(path, "saved_model.pb"))

    def load(self, path: str, options: ModelOptions) -> RecurrentStack:
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(path)
        except (OSError, ValueError) as error:
            raise ModelError(f"{path}: cannot be read as a SavedModel: {error}") from error
        step = loaded.signatures.get(STEP_SIGNATURE)
        if step is None:
            raise ModelError(
                f"{path}: the SavedModel has no {STEP_SIGNATURE!r} signature (it has: "
                f"{', '.join(sorted(loaded.signatures)) or 'none'}); seqcarry runs a "
                "SavedModel one time step at a time: export one with "
                "transforms.export.export_step_savedmodel (README, \"SavedModel\")")
        inputs = dict(step.structured_input_signature[1])
        outputs = dict(step.structured_outputs)
        x, out = inputs.pop("x", None), outputs.pop("outputs", None)
        names = tuple(sorted(inputs))
        problems = [problem for name, spec in [("x", x), ("outputs", out), *inputs.items(),
                                               *outputs.items()]
                    if (problem := _spec_problem(name, spec))]
        if set(inputs) != set(outputs):
            problems.append(f"its state inputs {sorted(inputs)} and state outputs "
                            f"{sorted(outputs)} must have the same names")
        elif not problems:
            problems = [f"state {name!r} has width {inputs[name].shape[1]} as an input but "
                        f"{outputs[name].shape[1]} as an output"
                        for name in names if inputs[name].shape[1] != outputs[name].shape[1]]
        problems += [f"state {name!r} must be named layer<K>_<part>, e.g. layer0_h"
                     for name in names if not re.fullmatch(r"layer\d+_[a-z0-9_]+", name)]
        if problems:
            raise ModelError(f"{path}: signature {STEP_SIGNATURE!r}: " + "; ".join(problems))
        layer = StepFunctionLayer(step, int(x.shape[1]), int(out.shape[1]), names,
                                  tuple(int(inputs[n].shape[1]) for n in names),
                                  _variables_sha256(path), owner=loaded)
        return RecurrentStack((layer,), source=f"{self.format_name}:{path}")


def _spec_problem(name: str, spec: Any) -> str | None:
    """Why a tensor of the step signature is not float32 [batch, width], or None."""
    import tensorflow as tf

    if spec is None:
        return f"{name!r} is missing"
    if spec.dtype != tf.float32 or spec.shape.rank != 2 or spec.shape[1] is None:
        return f"{name!r} must be float32 [batch, width], not {spec}"
    return None


def _variables_sha256(path: str) -> str:
    """Digest of the SavedModel's variables (names, dtypes, shapes, values), read from
    its variables checkpoint in sorted order of name."""
    import tensorflow as tf

    digest = hashlib.sha256()
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    for name in sorted(reader.get_variable_to_shape_map()):
        value = np.asarray(reader.get_tensor(name))
        if value.dtype.kind in "fiub":  # numbers; not the object graph, strings
            digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode()
                          + np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


LOADERS: Sequence[ModelLoader] = (KerasLoader(), SavedModelLoader(), KerasCheckpointLoader(),
                                  TF1CheckpointLoader())


def load_model(url: str, options: ModelOptions | None = None) -> RecurrentStack:
    """Load a model of any supported format, local or at an fsspec URL (``gs://...``),
    into a :class:`RecurrentStack`.

    ``url`` is a ``.keras`` file, a SavedModel directory, a checkpoint prefix
    (``model.ckpt`` for ``model.ckpt.index`` + ``model.ckpt.data-*``; the ``.index``
    file itself is accepted too) or a directory holding a ``checkpoint`` file. The
    format is detected; ``options`` covers what detection cannot see.
    """
    url = url.removesuffix(".index")
    if storage.exists(url):
        path = storage.local_copy(url)
    elif storage.exists(url + ".index"):
        path = storage.local_copy_checkpoint(url)
    else:
        raise ModelError(f"model file {url} does not exist")
    for loader in LOADERS:
        if loader.can_load(path):
            return loader.load(path, options or ModelOptions())
    raise ModelError(f"{path}: unknown model format; supported: "
                     + ", ".join(loader.format_name for loader in LOADERS)
                     + " (see README, \"Models\")")
