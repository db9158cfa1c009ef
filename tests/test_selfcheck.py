"""``seqcarry selfcheck``: real models through the kernel against their own framework."""
import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.demo import cut_into_chunks, make_model, make_sequences, write_chunk_files
from pipeline.selfcheck import (compare, model_oracle, random_sequences, result_line,
                                selfcheck, verdict)
from schemas import InputError
from transforms.export import export_step_savedmodel
from transforms.models import ModelOptions, load_model

SEQCARRY = os.path.join(os.path.dirname(sys.executable), "seqcarry")
SMALL = dict(sequences=6, max_steps=40)


def seqcarry(*args):
    return subprocess.run([SEQCARRY, *args], capture_output=True, text=True, timeout=600)


def randomized(model, seed=0):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    return model


def gru_model(seed=0):
    L = keras.layers
    return randomized(keras.Sequential([
        keras.Input((None, 3)), L.GRU(5, return_sequences=True),
        L.GRU(4, return_sequences=True, reset_after=False, activation="relu"),
        L.Dense(2)]), seed)


def assert_ok(summary, tolerance=1e-5):
    assert summary["ok"], summary
    for path in ("xla", "plain"):
        result = summary["paths"][path]
        assert result["outputs_max_abs_diff"] < tolerance
        assert result["states_max_abs_diff"] < tolerance
    assert summary["min_steps"] == 1  # a one-step sequence is always among them


def test_cli_lstm_keras_model_passes(tmp_path):
    model = make_model(str(tmp_path / "model.keras"), input_dim=4, units=(8, 6), output_dim=3)
    done = seqcarry("selfcheck", "--model", model, "--sequences", "6", "--max-steps", "40")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert_ok(summary)
    assert summary["format"] == "keras" and summary["sequences"] == 6
    assert summary["fingerprint"] == load_model(model).fingerprint
    assert done.stderr.strip().splitlines()[-1].startswith("seqcarry: ok: selfcheck keras")


def test_gru_keras_model_and_its_tf_checkpoint_pass(tmp_path):
    model = gru_model()
    model.save(str(tmp_path / "gru.keras"))
    assert_ok(selfcheck(str(tmp_path / "gru.keras"), **SMALL))
    # A tf.train.Checkpoint, checked against TensorFlow's own restore of it.
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt" / "model"))
    (tmp_path / "arch.json").write_text(model.to_json())
    summary = selfcheck(prefix, ModelOptions(architecture=str(tmp_path / "arch.json")),
                        **SMALL)
    assert summary["format"] == "tf-checkpoint"
    assert_ok(summary)


def test_embedding_model_gets_token_ids_and_passes(tmp_path):
    L = keras.layers
    path = str(tmp_path / "embedding.keras")
    randomized(keras.Sequential([keras.Input((None,), dtype="int32"),
                                 L.Embedding(13, 4, mask_zero=True),
                                 L.LSTM(5, return_sequences=True), L.Dense(2)])).save(path)
    stack = load_model(path)
    whole = random_sequences(stack, 5, 30, np.random.default_rng(0))
    ids = np.concatenate(list(whole.values()))
    assert ids.min() >= 0 and ids.max() < 13 and np.all(ids == np.round(ids))
    assert_ok(selfcheck(path, **SMALL))


def test_savedmodel_checked_against_its_own_step_signature(tmp_path):
    directory = export_step_savedmodel(gru_model(), str(tmp_path / "savedmodel"))
    summary = selfcheck(directory, sequences=4, max_steps=20)
    assert summary["format"] == "savedmodel"
    assert_ok(summary)


def test_chunk_files_are_the_inputs(tmp_path):
    model = make_model(str(tmp_path / "model.keras"), input_dim=3, units=(6,), output_dim=2)
    rng = np.random.default_rng(1)
    whole = make_sequences(rng, 10, input_dim=3, max_steps=30)
    chunks = [c for sequence_id, features in whole.items()
              for c in cut_into_chunks(rng, sequence_id, features, max_chunk=7)]
    write_chunk_files(str(tmp_path / "chunks"), chunks, files=3, rng=rng)
    done = seqcarry("selfcheck", "--model", model, "--chunks", str(tmp_path / "chunks"),
                    "--sequences", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["inputs"] == "chunk files" and summary["sequences"] == 4
    assert summary["ok"]
    # The whole of each sampled sequence, in chunk order (lengths of real sequences).
    lengths = sorted(len(f) for f in whole.values())
    assert summary["max_steps"] <= lengths[-1] and summary["min_steps"] >= lengths[0]


def test_the_check_fails_when_the_kernel_computes_something_else(tmp_path):
    """The kernel runs one model's weights, the oracle is another model of the same
    architecture: the difference is reported, and the verdict is a failure."""
    first = make_model(str(tmp_path / "a.keras"), input_dim=3, units=(6,), output_dim=2, seed=1)
    other = make_model(str(tmp_path / "b.keras"), input_dim=3, units=(6,), output_dim=2, seed=2)
    stack, rng = load_model(first), np.random.default_rng(0)
    whole = random_sequences(stack, 4, 20, rng)
    oracle = model_oracle(load_model(other))
    expected = {sequence_id: oracle(features) for sequence_id, features in whole.items()}
    summary = verdict(stack, whole, {"xla": compare(stack, whole, expected, rng, xla=True)},
                      tolerance=1e-3)
    assert not summary["ok"] and summary["worst"]["max_abs_diff"] > 1e-3
    line = result_line(summary)
    assert line.startswith("seqcarry: error: selfcheck failed: xla path's ")
    assert "(tolerance 0.001)" in line


def test_unsupported_format_and_bad_arguments_are_refused(tmp_path):
    model = make_model(str(tmp_path / "model.keras"), input_dim=3, units=(4,), output_dim=None)
    stack = load_model(model)
    tf1 = dataclasses.replace(stack, source="tf1-checkpoint:" + model)
    with pytest.raises(InputError, match="supports keras, tf-checkpoint, savedmodel.*TF1"):
        model_oracle(tf1)
    done = seqcarry("selfcheck", "--model", model, "--tolerance", "-1")
    assert done.returncode == 2
    assert "--tolerance must be >= 0" in done.stderr.strip().splitlines()[-1]
