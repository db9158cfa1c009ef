"""Models as a plain description of a recurrent stack, loaders that produce it, and
the model fingerprint.

Every model format is loaded into the same :class:`RecurrentStack`: recurrent layers
(weights in Keras' layout and gate order) followed by an optional per-step head of
dense layers. The compute kernel (:mod:`transforms.kernel`) only ever sees this
description, so a new format is one more :class:`ModelLoader`. No Beam here.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
from typing import Sequence

import numpy as np

# Activation names the kernel implements, with Keras 3's meaning of each.
ACTIVATIONS = ("linear", "tanh", "sigmoid", "hard_sigmoid", "relu", "softmax", "elu",
               "softplus", "swish", "silu", "gelu")


class ModelError(ValueError):
    """The model file cannot be used: unknown format, unsupported layer, bad weights."""


@dataclasses.dataclass(frozen=True, eq=False)
class LSTMLayer:
    """One LSTM layer in Keras' layout: gates ordered input, forget, cell, output.

    kernel [input_dim, 4 * units], recurrent_kernel [units, 4 * units], bias [4 * units].
    """
    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"

    kind = "lstm"
    state_parts = ("h", "c")

    @property
    def units(self) -> int:
        return int(self.recurrent_kernel.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.kernel.shape[0])

    def config(self) -> dict:
        return {"kind": self.kind, "units": self.units, "input_dim": self.input_dim,
                "activation": self.activation,
                "recurrent_activation": self.recurrent_activation}

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.kernel, self.recurrent_kernel, self.bias)


@dataclasses.dataclass(frozen=True, eq=False)
class DenseLayer:
    """A dense layer applied to every step: kernel [input_dim, units], bias [units]."""
    kernel: np.ndarray
    bias: np.ndarray
    activation: str = "linear"

    kind = "dense"

    @property
    def units(self) -> int:
        return int(self.kernel.shape[1])

    def config(self) -> dict:
        return {"kind": self.kind, "units": self.units, "input_dim": int(self.kernel.shape[0]),
                "activation": self.activation}

    def weights(self) -> tuple[np.ndarray, ...]:
        return (self.kernel, self.bias)


@dataclasses.dataclass(frozen=True, eq=False)
class RecurrentStack:
    """A model as seqcarry runs it: recurrent layers, then an optional per-step head.

    ``source`` says where it was loaded from (format and path), for messages only.
    """
    recurrent: tuple[LSTMLayer, ...]
    head: tuple[DenseLayer, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if not self.recurrent:
            raise ModelError(f"{self.source or 'model'}: no recurrent layer found")
        width = self.recurrent[0].input_dim
        for position, layer in enumerate(self.recurrent + self.head):
            if layer.kernel.shape[0] != width:
                raise ModelError(f"{self.source or 'model'}: layer {position} ({layer.kind}) "
                                 f"takes width {layer.kernel.shape[0]}, but receives {width}")
            for name in ("activation", "recurrent_activation"):
                activation = getattr(layer, name, "linear")
                if activation not in ACTIVATIONS:
                    raise ModelError(f"{self.source or 'model'}: layer {position} uses "
                                     f"{name}={activation!r}; supported: {', '.join(ACTIVATIONS)}")
            width = layer.units

    @property
    def input_dim(self) -> int:
        return self.recurrent[0].input_dim

    @property
    def output_dim(self) -> int:
        return (self.head or self.recurrent)[-1].units

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the carried state's parts, e.g. ``layer0_h``, ``layer0_c``, ``layer1_h``."""
        return tuple(f"layer{index}_{part}" for index, layer in enumerate(self.recurrent)
                     for part in layer.state_parts)

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return tuple(layer.units for layer in self.recurrent for _ in layer.state_parts)

    def zero_state(self) -> tuple[np.ndarray, ...]:
        """The state a sequence starts from."""
        return tuple(np.zeros(size, np.float32) for size in self.state_sizes)

    def describe(self) -> dict:
        """Architecture as plain data (also what the fingerprint hashes, with the weights)."""
        return {"recurrent": [layer.config() for layer in self.recurrent],
                "head": [layer.config() for layer in self.head]}

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the architecture and of every weight as float32 little-endian.

        It depends only on what is computed, not on the file format it came from, so
        the same weights loaded from another format continue the same carried state.
        """
        digest = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for layer in self.recurrent + self.head:
            for weight in layer.weights():
                digest.update(np.ascontiguousarray(weight, dtype="<f4").tobytes())
        return "sha256:" + digest.hexdigest()


class ModelLoader(abc.ABC):
    """Reads one model format into a :class:`RecurrentStack`."""

    format_name: str = ""

    @abc.abstractmethod
    def can_load(self, path: str) -> bool:
        """Whether ``path`` looks like this loader's format."""

    @abc.abstractmethod
    def load(self, path: str) -> RecurrentStack:
        """Load ``path``; raise :class:`ModelError` with a clear message when it cannot."""


class KerasLoader(ModelLoader):
    """Keras 3 ``.keras`` files: a chain of ``LSTM(return_sequences=True)`` layers,
    optionally followed by ``Dense`` layers applied per step."""

    format_name = "keras"

    def can_load(self, path: str) -> bool:
        return path.endswith(".keras")

    def load(self, path: str) -> RecurrentStack:
        import keras  # deferred: importing Keras costs seconds

        try:
            model = keras.models.load_model(path, compile=False)
        except (OSError, ValueError) as error:
            raise ModelError(f"{path}: cannot be read as a Keras model: {error}") from error
        recurrent, head = [], []
        for layer in model.layers:
            kind = type(layer).__name__
            config = layer.get_config()
            if kind == "InputLayer":
                continue
            if kind == "LSTM":
                if head:
                    raise ModelError(f"{path}: LSTM layer {layer.name!r} after a Dense layer; "
                                     "dense layers are only supported as a per-step head")
                if not config["return_sequences"] or config["go_backwards"]:
                    raise ModelError(f"{path}: LSTM layer {layer.name!r} must have "
                                     "return_sequences=True and go_backwards=False")
                kernel, recurrent_kernel, *bias = layer.get_weights()
                units = recurrent_kernel.shape[0]
                recurrent.append(LSTMLayer(
                    kernel, recurrent_kernel,
                    bias[0] if bias else np.zeros(4 * units, np.float32),
                    config["activation"], config["recurrent_activation"]))
            elif kind == "Dense":
                kernel, *bias = layer.get_weights()
                head.append(DenseLayer(
                    kernel, bias[0] if bias else np.zeros(kernel.shape[1], np.float32),
                    config["activation"]))
            else:
                raise ModelError(
                    f"{path}: layer {layer.name!r} of type {kind} is not supported; "
                    "a model must be stacked LSTM(return_sequences=True) layers, "
                    "optionally followed by Dense layers")
        return RecurrentStack(tuple(recurrent), tuple(head), source=f"keras:{path}")


LOADERS: Sequence[ModelLoader] = (KerasLoader(),)


def load_model(url: str) -> RecurrentStack:
    """Load a model file of any supported format, local or at an fsspec URL
    (``gs://...``), into a :class:`RecurrentStack`."""
    from pipeline import storage

    if not storage.exists(url):
        raise ModelError(f"model file {url} does not exist")
    path = storage.local_copy(url)
    for loader in LOADERS:
        if loader.can_load(path):
            return loader.load(path)
    raise ModelError(f"{path}: unknown model format; supported: "
                     + ", ".join(loader.format_name for loader in LOADERS))
