"""Export a Keras model as a SavedModel with the ``step`` signature seqcarry runs.

The signature (see :class:`transforms.models.saved_model.SavedModelLoader`) computes
one time step with Keras' own layers: ``step(x=[B, input_dim], layer0_h=[B, h0], ...) ->
{"outputs": [B, output_dim], "layer0_h": ..., ...}``.
"""
from __future__ import annotations

from typing import Any

from transforms.models import (STEP_SIGNATURE, EmbeddingLayer, ModelError, masks_inputs,
                               stack_from_keras)
from transforms.reference import keras_with_state


def export_step_savedmodel(keras_model_or_path: Any, export_dir: str) -> str:
    """Write ``keras_model_or_path`` (a Keras model, or a ``.keras`` path) to
    ``export_dir`` as a SavedModel whose ``step`` signature runs one time step;
    returns ``export_dir``.

    The model must be one seqcarry runs from a ``.keras`` file. A classifier
    (``return_sequences=False``) is marked as one (the ``seqcarry_sequence_output``
    variable), so runs keep each chunk's last output by default, as for its ``.keras``
    file. A model with an input mask (``Masking``, ``Embedding(mask_zero=True)``) is
    refused, since one step cannot repeat the previous step's output on a masked step:
    run the ``.keras`` file itself instead. With an ``Embedding``, ``x`` is [B, 1]
    token ids as float32.
    """
    import keras
    import tensorflow as tf

    model = (keras.models.load_model(keras_model_or_path, compile=False)
             if isinstance(keras_model_or_path, str) else keras_model_or_path)
    stack = stack_from_keras(model, f"keras:{keras_model_or_path}"
                             if isinstance(keras_model_or_path, str) else "keras model")
    if masks_inputs(stack.input_layer):
        raise ModelError(f"{stack.source}: a model with an input mask cannot be exported "
                         "as one step; run the .keras file itself")
    with_state = keras_with_state(model)
    token_ids = isinstance(stack.input_layer, EmbeddingLayer)
    states = {name: tf.TensorSpec([None, size], tf.float32, name=name)
              for name, size in zip(stack.state_names, stack.state_sizes)}

    @tf.function(input_signature=[tf.TensorSpec([None, stack.input_dim], tf.float32,
                                                name="x"), states])
    def step(x, states):
        sequence = tf.cast(x, tf.int32) if token_ids else x[:, None, :]
        outputs, *new_states = with_state([sequence, *(states[n] for n in stack.state_names)])
        return {"outputs": outputs[:, 0], **dict(zip(stack.state_names, new_states))}

    module = tf.Module()
    module.model = with_state  # tracked, so its variables are saved
    module.step = step
    if not stack.sequence_output:  # only then: other exports keep their fingerprints
        module.seqcarry_sequence_output = tf.Variable(False, trainable=False)
    tf.saved_model.save(module, export_dir, signatures={STEP_SIGNATURE: step})
    return export_dir
