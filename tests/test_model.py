"""Loading real Keras files, their numerics against Keras itself, clear refusals,
and the model fingerprint."""
import keras
import numpy as np
import pytest

from pipeline.demo import make_model
from transforms.kernel import StepKernel
from transforms.models import ModelError, load_model
from transforms.reference import keras_whole_sequence


def save(tmp_path, name, *layers):
    path = str(tmp_path / name)
    keras.Sequential([keras.Input((None, 4)), *layers]).save(path)
    return path


def run_whole(stack, features):
    kernel = StepKernel(stack, window_steps=7)
    outputs, states = kernel.run(features[None], np.array([len(features)]),
                                 [s[None] for s in stack.zero_state()])
    return outputs[0], [s[0] for s in states]


def test_keras_model_loads_and_matches_keras_on_the_whole_sequence(tmp_path):
    path = make_model(str(tmp_path / "m.keras"), input_dim=4, units=(6, 5), output_dim=3)
    stack = load_model(path)
    assert (stack.input_dim, stack.output_dim) == (4, 3)
    assert stack.state_names == ("layer0_h", "layer0_c", "layer1_h", "layer1_c")
    features = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)

    outputs, states = run_whole(stack, features)

    expected_outputs, expected_states = keras_whole_sequence(path)(features)
    np.testing.assert_allclose(outputs, expected_outputs, atol=1e-5)
    np.testing.assert_allclose(
        keras.models.load_model(path)(features[None]).numpy()[0], outputs, atol=1e-5)
    for got, want in zip(states, expected_states):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_activations_follow_keras_definitions(tmp_path):
    path = save(tmp_path, "act.keras",
                keras.layers.LSTM(5, activation="relu", recurrent_activation="hard_sigmoid",
                                  return_sequences=True),
                keras.layers.Dense(3, activation="softmax"))
    features = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    outputs, _ = run_whole(load_model(path), features)
    expected = keras.models.load_model(path)(features[None]).numpy()[0]
    np.testing.assert_allclose(outputs, expected, atol=1e-5)


@pytest.mark.parametrize("layer, message", [
    (keras.layers.Permute((2, 1)), "of type Permute is not supported"),
    (keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True)),
     "of type Bidirectional is not supported: it is not causal"),
    (keras.layers.LSTM(3, return_sequences=True, go_backwards=True),
     "must have go_backwards=False"),
])
def test_unsupported_layers_are_refused_with_a_clear_message(tmp_path, layer, message):
    path = save(tmp_path, "bad.keras", layer)
    with pytest.raises(ModelError, match=message):
        load_model(path)


def test_dense_before_a_recurrent_layer_runs_step_by_step(tmp_path):
    path = save(tmp_path, "order.keras", keras.layers.Dense(3, activation="relu"),
                keras.layers.LSTM(3, return_sequences=True))
    features = np.random.default_rng(2).normal(size=(20, 4)).astype(np.float32)
    outputs, _ = run_whole(load_model(path), features)
    expected = keras.models.load_model(path)(features[None]).numpy()[0]
    np.testing.assert_allclose(outputs, expected, atol=1e-5)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope.keras"))
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown model format"):
        load_model(str(other))


def test_fingerprint_depends_on_weights_and_architecture_not_on_the_file(tmp_path):
    first = make_model(str(tmp_path / "a.keras"), 4, (6,), 3, seed=5)
    again = make_model(str(tmp_path / "b.keras"), 4, (6,), 3, seed=5)
    other_weights = make_model(str(tmp_path / "c.keras"), 4, (6,), 3, seed=6)
    no_head = make_model(str(tmp_path / "d.keras"), 4, (6,), None, seed=5)
    fingerprint = load_model(first).fingerprint
    assert fingerprint.startswith("sha256:")
    assert load_model(again).fingerprint == fingerprint
    assert load_model(other_weights).fingerprint != fingerprint
    assert load_model(no_head).fingerprint != fingerprint
