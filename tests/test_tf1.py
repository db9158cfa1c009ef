"""TF1 checkpoints written by real TF1 graph code (tests/tf1_checkpoints.py: cells,
MultiRNNCell, dynamic_rnn, tf.train.Saver), against TF1's own whole-sequence outputs
computed by dynamic_rnn in a session; the seed's migration path; clear errors."""
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import storage
from pipeline import results
from pipeline.build import run_job
from pipeline.importer import import_state
from pipeline.options import RunConfig
from schemas import Chunk
from tests.chunked import assert_equals_whole_sequence, run_chunked
from tests.conftest import IN_PROCESS, TWO_WORKERS
from tests.test_pipeline import write_chunks
from transforms.kernel import StepKernel
from transforms.models import ModelError, ModelOptions, load_model


def oracle(directory):
    """TF1's whole-sequence results: {sequence_id: (features, outputs, final states)}."""
    data = np.load(directory / "oracle.npz")
    states = [data[f"state_{k}"] for k in range(len(data.files) - 3)]
    return {f"seq-{row:02d}": (data["inputs"][row, :length],
                               data["outputs"][row, :length],
                               [state[row] for state in states])
            for row, length in enumerate(data["lengths"])}


def max_difference_on_batch(stack, expected):
    """Run every sequence of ``expected`` in one ragged batch through the kernel;
    assert and return the largest difference from TF1."""
    rows = list(expected.values())
    lengths = np.array([len(features) for features, _, _ in rows])
    inputs = np.zeros((len(rows), lengths.max(), stack.input_dim), np.float32)
    for row, (features, _, _) in enumerate(rows):
        inputs[row, :lengths[row]] = features
    outputs, states = StepKernel(stack, window_steps=16).run(
        inputs, lengths, [np.zeros((len(rows), size), np.float32) for size in stack.state_sizes])
    worst = 0.0
    for row, (_, want_outputs, want_states) in enumerate(rows):
        np.testing.assert_allclose(outputs[row, :lengths[row]], want_outputs, atol=1e-5)
        for part, want in zip(states, want_states, strict=True):
            np.testing.assert_allclose(part[row], want, atol=1e-5)
        worst = max([worst, float(np.abs(outputs[row, :lengths[row]] - want_outputs).max())]
                    + [float(np.abs(part[row] - want).max())
                       for part, want in zip(states, want_states)])
    return worst


@pytest.mark.parametrize("name, location, options, layers", [
    # the seed's way: saver.save(sess, dir + "/model.ckpt"); --model may name the directory
    ("seed_style", "", {}, [("lstm", 8)]),
    ("peephole_projection", "model.ckpt",  {}, [("lstm", 4), ("lstm", 5), ("lstm", 3)]),
    ("gru_stack", "model.ckpt.index", {"tf1_forget_bias": 0.25},
     [("gru", 6), ("lstm", 5), ("gru", 4)]),
    ("two_rnns_decoder", "model.ckpt", {}, [("gru", 4)]),
    ("two_rnns_encoder", "model.ckpt",
     {"tf1_scopes": (("encoder/rnn/my_cell", "rnn/basic_lstm_cell"),)}, [("lstm", 5)]),
])
def test_tf1_checkpoints_match_tf1_dynamic_rnn(tf1_checkpoints, name, location, options,
                                                layers):
    directory = tf1_checkpoints / name
    stack = load_model(str(directory / location), ModelOptions(**options))
    assert stack.format == "tf1-checkpoint"
    assert [(layer.kind, layer.output_dim) for layer in stack.recurrent] == layers
    worst = max_difference_on_batch(stack, oracle(directory))
    print(f"max abs diff vs TF1 dynamic_rnn ({name}): {worst:.3g}")


def test_peepholes_projection_and_head_are_read(tf1_checkpoints):
    stack = load_model(str(tf1_checkpoints / "peephole_projection" / "model.ckpt"))
    assert [(layer.peepholes is not None, layer.projection is not None)
            for layer in stack.recurrent] == [(True, True), (True, False), (False, True)]
    assert stack.state_names == ("layer0_h", "layer0_c", "layer1_h", "layer1_c",
                                 "layer2_h", "layer2_c")
    assert stack.state_sizes == (4, 7, 5, 5, 3, 6)  # h is the projection's width
    assert (stack.input_dim, stack.output_dim, stack.layers[-1].kind) == (3, 2, "dense")
    assert len(stack.layers) == 4
    assert stack.notes == ()


@pytest.mark.parametrize("name, config, beam_args", [
    ("peephole_projection", {}, IN_PROCESS),
    # The model options must reach the model loaded in each worker process.
    pytest.param("gru_stack", {"tf1_forget_bias": 0.25}, TWO_WORKERS,
                 marks=pytest.mark.slow),
])
def test_tf1_pipeline_over_chunked_runs_equals_tf1_on_whole_sequences(
        tf1_checkpoints, tmp_path, name, config, beam_args):
    directory = tf1_checkpoints / name
    expected = oracle(directory)
    whole = {sequence_id: features for sequence_id, (features, _, _) in expected.items()}
    state, reports = run_chunked(str(directory / "model.ckpt"), whole, tmp_path,
                                 beam_args=beam_args, **config)
    assert sum(r["chunks_processed"] for r in reports) == sum(r["chunks_read"] for r in reports)
    worst = assert_equals_whole_sequence(state, whole,
                                         lambda sequence_id, _: expected[sequence_id][1:])
    print(f"max abs diff vs TF1 dynamic_rnn ({name}), 3 chunked runs: {worst:.3g}")


def test_model_options_travel_with_the_pickled_dofn(tf1_checkpoints):
    """What a worker process does with its DoFn: unpickle it, set it up (load the
    model): the TF1 options must come along (cheap stand-in for the slow two-worker
    variant above)."""
    from apache_beam.internal import pickler

    from transforms.dofns import PlanAndRunBucket
    from transforms.sequencing import Planner

    path = str(tf1_checkpoints / "gru_stack" / "model.ckpt")
    options = ModelOptions(tf1_forget_bias=0.25)
    planner = Planner(run_id="r", run_number=1, started_at=0, zero_state=(),
                      model_fingerprint="")
    worker = pickler.loads(pickler.dumps(PlanAndRunBucket(path, planner, 4, 16, options)))
    worker.setup()
    assert worker._model.stack.fingerprint == load_model(path, options).fingerprint
    assert worker._model.stack.fingerprint != load_model(path).fingerprint


def keras_twin(stack, path):
    """A Keras model holding the weights of a TF1 checkpoint's one-LSTM stack with a
    dense head, written to ``path``."""
    layer, dense = stack.layers
    model = keras.Sequential([keras.Input((None, stack.input_dim)),
                              keras.layers.LSTM(layer.units, return_sequences=True),
                              keras.layers.Dense(dense.units)])
    model.set_weights([*layer.weights(), *dense.weights()])
    model.save(path)
    return path


def test_state_written_under_tf1_continues_under_keras_with_the_same_weights(
        tf1_checkpoints, tmp_path):
    directory = tf1_checkpoints / "seed_style"
    stack = load_model(str(directory))
    twin = keras_twin(stack, str(tmp_path / "twin.keras"))
    assert load_model(twin).fingerprint == stack.fingerprint
    features, expected_outputs, expected_states = oracle(directory)["seq-00"]
    state, outputs = str(tmp_path / "state"), str(tmp_path / "outputs")
    half = len(features) // 2
    for run, (model, chunk) in enumerate([(str(directory), Chunk("a", 0, features[:half])),
                                          (twin, Chunk("a", 1, features[half:]))]):
        run_job(RunConfig(model, write_chunks(tmp_path / f"c{run}", [chunk]), state, outputs,
                          run_id=f"r{run}"), IN_PROCESS)
    np.testing.assert_allclose(results.committed_outputs(state)["a"], expected_outputs,
                               atol=1e-5)
    for got, want in zip(results.committed_states(state)["a"].tensors, expected_states):
        np.testing.assert_allclose(got, want, atol=1e-5)

    other = keras.models.load_model(twin)
    other.set_weights([w + 0.01 for w in other.get_weights()])
    other.save(str(tmp_path / "other.keras"))
    with pytest.raises(ModelError, match="was written by model sha256:.*--reset-state"):
        run_job(RunConfig(str(tmp_path / "other.keras"),
                          write_chunks(tmp_path / "c2", [Chunk("a", 2, features[:3])]),
                          state, outputs, run_id="r2"), IN_PROCESS)


def test_seed_migration_numpy_h_c_then_chunks_continue(tf1_checkpoints, tmp_path):
    """A seed user ran the first part of each sequence in TF1 sessions and kept h, c
    with numpy: import them, and the rest of each sequence continues exactly."""
    directory = tf1_checkpoints / "seed_style"
    expected = oracle(directory)
    ids = [i for i, (features, _, _) in expected.items() if len(features) > 4][:3]
    cut = 4
    stack = load_model(str(directory))
    kernel = StepKernel(stack)
    # What the user had: h, c after the first 4 steps of each sequence (TF1 == kernel).
    first = np.stack([expected[i][0][:cut] for i in ids])
    _, (h, c) = kernel.run(first, np.full(len(ids), cut),
                           [np.zeros((len(ids), s), np.float32) for s in stack.state_sizes])
    np.savez(tmp_path / "states.npz", sequence_id=np.array(ids), layer0_h=h, layer0_c=c,
             next_chunk_index=np.ones(len(ids), np.int64), steps_seen=np.full(len(ids), cut))
    state = str(tmp_path / "state")
    report = import_state(str(directory), ModelOptions(), state, str(tmp_path / "states.npz"))
    assert report["sequences_imported"] == 3
    assert storage.StateStore(state).committed().model_fingerprint == stack.fingerprint

    rest = [Chunk(i, 1, expected[i][0][cut:]) for i in ids]
    run_job(RunConfig(str(directory), write_chunks(tmp_path / "rest", rest), state,
                      str(tmp_path / "outputs"), run_id="after-import"), IN_PROCESS)
    produced, carried = results.committed_outputs(state), results.committed_states(state)
    for i in ids:
        np.testing.assert_allclose(produced[i], expected[i][1][cut:], atol=1e-5)
        assert carried[i].steps_seen == len(expected[i][0])
        for got, want in zip(carried[i].tensors, expected[i][2]):
            np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(Exception, match="already has committed snapshots"):
        import_state(str(directory), ModelOptions(), state, str(tmp_path / "states.npz"))


def test_import_state_refuses_wrong_names_and_shapes(tf1_checkpoints, tmp_path):
    directory = str(tf1_checkpoints / "seed_style")
    np.savez(tmp_path / "h_only.npz", sequence_id=np.array(["a"]), h=np.zeros((1, 8)))
    with pytest.raises(Exception, match="missing layer0_h, layer0_c; unknown h"):
        import_state(directory, ModelOptions(), str(tmp_path / "s1"), str(tmp_path / "h_only.npz"))
    np.savez(tmp_path / "narrow.npz", sequence_id=np.array(["a"]), layer0_h=np.zeros((1, 7)),
             layer0_c=np.zeros((1, 8)))
    with pytest.raises(Exception, match=r"layer0_h has shape \[1, 7\]; the model needs \[1, 8\]"):
        import_state(directory, ModelOptions(), str(tmp_path / "s2"), str(tmp_path / "narrow.npz"))


@pytest.mark.parametrize("name, options, message", [
    ("bias_not_saved", {}, "missing variable rnn/basic_lstm_cell/bias"),
    ("two_rnns_encoder", {"tf1_scopes": (("encoder/rnn/my_cell", "encoder/rnn/basic_lstm_cell"),)},
     r"several RNNs \(decoder/rnn, encoder/rnn\); pick one with --tf1-scope SCOPE=rnn"),
    ("seed_style", {"tf1_scopes": (("rnn/basic_lstm_cell", "rnn/my_cell"),)},
     "no TF1 RNN cell found .* --tf1-scope OLD=NEW"),
    ("bidirectional", {}, r"a bidirectional RNN \(bidirectional_rnn/bw, "
                          r"bidirectional_rnn/fw\), which is not causal"),
])
def test_tf1_errors_are_clear(tf1_checkpoints, name, options, message):
    with pytest.raises(ModelError, match=message):
        load_model(str(tf1_checkpoints / name / "model.ckpt"), ModelOptions(**options))


def save_tf1_variables(path, shapes):
    """A checkpoint of variables of these names and shapes, saved by TF1's Saver."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        for name, shape in shapes.items():
            v1.get_variable(name, shape)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            v1.train.Saver().save(session, path)
    return path


@pytest.mark.parametrize("shapes, message", [
    # an output projection that does not fit the RNN's output
    ({"rnn/basic_lstm_cell/kernel": [11, 32], "rnn/basic_lstm_cell/bias": [32],
      "softmax_w": [5, 2]}, r"layer 1 \(dense\) takes width 5, but receives 8"),
    # a second cell whose input rows do not fit the first cell's output
    ({"rnn/multi_rnn_cell/cell_0/gru_cell/gates/kernel": [7, 8],
      "rnn/multi_rnn_cell/cell_0/gru_cell/gates/bias": [8],
      "rnn/multi_rnn_cell/cell_0/gru_cell/candidate/kernel": [7, 4],
      "rnn/multi_rnn_cell/cell_0/gru_cell/candidate/bias": [4],
      "rnn/multi_rnn_cell/cell_1/lstm_cell/kernel": [9, 16],
      "rnn/multi_rnn_cell/cell_1/lstm_cell/bias": [16]},
     "cell_1/lstm_cell/kernel has 9 rows: 4 for h leaves 5 for the input, but the layer "
     "below gives 4"),
    # Keras' LSTM layer in a TF1 graph: named like a cell, laid out otherwise
    ({"lstm/lstm_cell/kernel": [10, 16], "lstm/lstm_cell/recurrent_kernel": [4, 16],
      "lstm/lstm_cell/bias": [16]}, "holds a Keras LSTM layer's variables"),
])
def test_checkpoints_that_do_not_fit_are_refused(tmp_path, shapes, message):
    with pytest.raises(ModelError, match=message):
        load_model(save_tf1_variables(str(tmp_path / "model.ckpt"), shapes))


def test_inspect_model_lists_what_it_found(tf1_checkpoints):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "inspect-model",
         str(tf1_checkpoints / "two_rnns_encoder" / "model.ckpt"), "--tf1-scope",
         "encoder/rnn/my_cell=rnn/basic_lstm_cell", "--json"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["format"] == "tf1-checkpoint"
    assert (summary["input_width"], summary["output_width"]) == (3, 5)
    assert summary["state_parts"] == {"layer0_h": 5, "layer0_c": 5}
    assert summary["fingerprint"].startswith("sha256:")
    assert "decoder/rnn/gru_cell/gates/kernel" in summary["notes"][0]
