"""The ``savedmodel`` format: a SavedModel directory with a ``step`` signature, run as
a black box one time step at a time (a :class:`StepFunctionLayer`). TensorFlow is
imported only when loading.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import numpy as np

from transforms.models.description import (STEP_SIGNATURE, ModelError, ModelLoader,
                                           ModelOptions, RecurrentStack, StepFunctionLayer)


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
        # Set by export_step_savedmodel for a classifier (one output per sequence).
        marker = getattr(loaded, "seqcarry_sequence_output", None)
        return RecurrentStack((layer,), source=f"{self.format_name}:{path}",
                              sequence_output=True if marker is None else bool(marker.numpy()))


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
