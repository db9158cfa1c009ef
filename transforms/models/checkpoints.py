"""TensorFlow checkpoints on disk, as both checkpoint formats find them: where the
prefix is, and the object graph that tells a ``tf.train.Checkpoint`` (see
:mod:`transforms.models.keras_checkpoint`) from a TF1 ``tf.train.Saver`` checkpoint
(see :mod:`transforms.models.tf1_checkpoint`). TensorFlow is imported only when needed.
"""
from __future__ import annotations

import os
from typing import Any


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


def object_graph(prefix: str) -> Any | None:
    """The object graph of a ``tf.train.Checkpoint`` (None for a TF1 ``Saver`` one)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(prefix)
    if not reader.has_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"):
        return None
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph
