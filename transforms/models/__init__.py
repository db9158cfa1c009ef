"""Models: one description of what seqcarry runs, one loader per file format, and the
registry that picks the loader (Beam's RunInference has one ModelHandler per framework
in the same way).

* :mod:`transforms.models.description`: :class:`RecurrentStack` (layers in one
  canonical layout, the fingerprint) and the :class:`ModelLoader` interface;
* one module per format, each a :class:`ModelLoader`, tried in this order:

========================  ===================================================
format                    what ``--model`` points at
========================  ===================================================
``keras``                 a Keras 3 ``.keras`` file (:mod:`.keras_file`)
``savedmodel``            a SavedModel directory with a ``step`` signature (a black
                          box run one step at a time; :mod:`.saved_model`)
``tf-checkpoint``         a ``tf.train.Checkpoint`` of a Keras model (prefix), with
                          the architecture given by ``ModelOptions.architecture``
                          (:mod:`.keras_checkpoint`)
``tf1-checkpoint``        a ``tf.train.Saver`` checkpoint (prefix) of TF1 RNN cells
                          (:mod:`.tf1_checkpoint`)
========================  ===================================================

Importing this package imports neither TensorFlow nor Keras: loaders import them when
they read a file. No Beam here.
"""
from __future__ import annotations

from typing import Sequence

import storage
from transforms.models.checkpoints import checkpoint_prefix, object_graph
from transforms.models.description import (ACTIVATIONS, MERGE_OPERATIONS, STEP_SIGNATURE,
                                           ActivationLayer, BatchNormLayer, CausalConvLayer,
                                           DenseLayer,
                                           EmbeddingLayer, GRULayer, LayerNormLayer,
                                           LSTMLayer, MaskingLayer, MergeLayer, ModelError,
                                           ModelLoader, ModelOptions, RecurrentStack,
                                           SimpleRNNLayer, StepFunctionLayer, masks_inputs)
from transforms.models.keras_checkpoint import KerasCheckpointLoader
from transforms.models.keras_file import (KerasLoader, keras_operations, read_keras,
                                          stack_from_keras)
from transforms.models.saved_model import SavedModelLoader
from transforms.models.tf1_checkpoint import TF1CheckpointLoader, stack_from_tf1

__all__ = [
    "ACTIVATIONS", "MERGE_OPERATIONS", "STEP_SIGNATURE", "LOADERS", "ActivationLayer",
    "BatchNormLayer", "CausalConvLayer", "DenseLayer", "EmbeddingLayer", "GRULayer",
    "KerasCheckpointLoader", "KerasLoader", "LSTMLayer", "LayerNormLayer", "MaskingLayer",
    "MergeLayer", "ModelError", "ModelLoader", "ModelOptions", "RecurrentStack",
    "SavedModelLoader", "SimpleRNNLayer", "StepFunctionLayer", "TF1CheckpointLoader",
    "checkpoint_prefix", "keras_operations", "load_model", "masks_inputs", "object_graph",
    "read_keras", "stack_from_keras", "stack_from_tf1",
]

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
