"""The ``tf-checkpoint`` format: a ``tf.train.Checkpoint`` of a Keras model, whose
weights are read into the architecture named by ``ModelOptions.architecture`` (a
checkpoint does not hold one). TensorFlow and Keras are imported only when loading.
"""
from __future__ import annotations

import re

import storage
from transforms.models.checkpoints import checkpoint_prefix, object_graph
from transforms.models.description import (ModelError, ModelLoader, ModelOptions,
                                           RecurrentStack)
from transforms.models.keras_file import read_keras, stack_from_keras


class KerasCheckpointLoader(ModelLoader):
    """A ``tf.train.Checkpoint(model=keras_model)`` written by ``write``/``save``: the
    weights come from it, the architecture from ``ModelOptions.architecture``."""

    format_name = "tf-checkpoint"

    def can_load(self, path: str) -> bool:
        prefix = checkpoint_prefix(path)
        return prefix is not None and object_graph(prefix) is not None

    def load(self, path: str, options: ModelOptions) -> RecurrentStack:
        import tensorflow as tf

        prefix = checkpoint_prefix(path)
        if not options.architecture:
            raise ModelError(f"{prefix} is a tf.train.Checkpoint, which holds weights but "
                             "not the architecture: pass --model-architecture (a .keras "
                             "file or a JSON file of model.to_json())")
        model = read_keras(storage.local_copy(options.architecture))
        children = [child.local_name for child in object_graph(prefix).nodes[0].children
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

