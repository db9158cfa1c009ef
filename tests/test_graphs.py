"""Models beyond a chain of recurrent layers: functional graphs with skip connections,
per-step layers between recurrent ones, causal convolutions that carry their window of
past inputs, and classifiers; each against Keras on the whole sequence (the model
called on it directly, and its stateful twin for the carried states)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.chunked import assert_equals_whole_sequence, run_chunked
from tests.conftest import TWO_WORKERS
from tests.test_formats import (INPUT_DIM, MASK_VALUE, VOCABULARY, assert_close,
                                features_for, randomized, run_in_chunks)
from transforms.export import export_step_savedmodel
from transforms.kernel import StepKernel
from transforms.models import ModelError, ModelOptions, load_model
from transforms.reference import keras_whole_sequence

L = keras.layers


def graph_model(kind, seed=0):
    """The functional models of these tests, by name; ``masked`` reads features with
    masked steps and ``embedding`` token ids, as in :func:`features_for`."""
    if kind == "embedding":
        ids = keras.Input((None,), dtype="int32")
        embedded = L.Embedding(VOCABULARY, 4)(ids)
        recurrent = L.GRU(4, return_sequences=True)(embedded)
        normalized = L.LayerNormalization(center=False)(L.Add()([recurrent, embedded]))
        return randomized(keras.Model(ids, L.Dense(2)(normalized)), seed)
    inputs = keras.Input((None, INPUT_DIM))
    if kind == "skip_connections":
        first = L.LSTM(5, return_sequences=True)(inputs)
        second = L.GRU(5, return_sequences=True)(L.LayerNormalization()(first))
        merged = L.Concatenate()([L.Add()([first, second]), inputs])
        outputs = L.Dense(2)(L.Dropout(0.3)(L.Dense(6, activation="relu")(merged)))
    elif kind == "causal_conv":
        # A TCN-like stack: dilations 1 and 4 carry 1 and 8 past inputs; then a
        # pointwise convolution (nothing carried) and a recurrent layer beside them.
        conv = L.Conv1D(4, 2, padding="causal", activation="relu")(inputs)
        conv = L.Conv1D(4, 3, padding="causal", dilation_rate=4, activation="tanh")(conv)
        pointwise = L.Conv1D(3, 1)(conv)
        recurrent = L.SimpleRNN(3, return_sequences=True)(inputs)
        merged = L.Average()([L.Maximum()([pointwise, recurrent]),
                              L.Multiply()([pointwise, L.Activation("sigmoid")(recurrent)]),
                              L.Subtract()([recurrent, L.Minimum()([pointwise, recurrent])])])
        outputs = L.Dense(2)(merged)
    elif kind == "masked":
        masked = L.Masking(MASK_VALUE)(inputs)
        first = L.LSTM(4, return_sequences=True)(masked)
        second = L.SimpleRNN(4, return_sequences=True)(L.LayerNormalization()(first))
        outputs = L.Dense(2)(L.Concatenate()([first, second, masked]))
    elif kind == "dense_first":
        projected = L.Activation("swish")(L.Dense(6)(inputs))
        outputs = L.Dense(2)(L.LSTM(4, return_sequences=True)(projected))
    elif kind == "normalizations":
        normalized = L.BatchNormalization()(L.Dense(6)(inputs))
        recurrent = L.LSTM(4, return_sequences=True)(L.ReLU()(normalized))
        outputs = L.Softmax()(L.Dense(3)(L.ELU()(recurrent)))
    model = randomized(keras.Model(inputs, outputs), seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):  # a variance is positive
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma, beta, mean, np.abs(variance) + 0.1])
    return model


def keras_input(kind, features):
    return features[None, :, 0].astype(np.int32) if kind == "embedding" else features[None]


@pytest.mark.parametrize("kind", ["skip_connections", "causal_conv", "masked", "embedding",
                                  "dense_first", "normalizations"])
def test_graph_models_in_chunks_match_keras_on_the_whole_sequence(tmp_path, kind):
    model = graph_model(kind)
    path = str(tmp_path / f"{kind}.keras")
    model.save(path)
    stack = load_model(path)
    features = features_for(kind if kind in ("masked", "embedding") else "plain")
    if kind == "masked":
        features = features_for("masking")

    outputs, states = run_in_chunks(stack, features)

    np.testing.assert_allclose(outputs, model(keras_input(kind, features)).numpy()[0],
                               atol=1e-5)
    worst = assert_close(outputs, states, *keras_whole_sequence(path)(features))
    print(f"max abs diff vs Keras ({kind}): {worst:.3g}")


def test_causal_convolution_carries_exactly_its_window():
    model = graph_model("causal_conv")
    stack = load_model_from(model)
    windows = {name: size for name, size in zip(stack.state_names, stack.state_sizes)
               if name.endswith("_window")}
    # kernel 2, dilation 1: one past input of 3 features; kernel 3, dilation 4: eight
    # past inputs of 4 features; the pointwise convolution carries nothing.
    assert windows == {"layer0_window": 1 * INPUT_DIM, "layer1_window": 8 * 4}
    features = features_for("plain", steps=30, seed=5)
    for cuts in [(0, 1, 2, 3, 30), (0, 8, 9, 17, 30), tuple(range(31))]:
        outputs, _ = run_in_chunks(stack, features, cuts)
        np.testing.assert_allclose(outputs, model(features[None]).numpy()[0], atol=1e-5)


def load_model_from(model):
    from transforms.models import stack_from_keras
    return stack_from_keras(model, "keras:test")


def test_classifier_says_at_each_step_what_it_would_say_if_the_sequence_ended_there(
        tmp_path):
    model = randomized(keras.Sequential([
        keras.Input((None, INPUT_DIM)), L.LSTM(5, return_sequences=True), L.LSTM(4),
        L.Dense(3, activation="softmax")]))
    path = str(tmp_path / "classifier.keras")
    model.save(path)
    stack = load_model(path)
    assert stack.sequence_output is False
    features = features_for("plain", steps=20, seed=3)

    outputs, states = run_in_chunks(stack, features, (0, 1, 7, 8, 20))

    # Keras itself on each prefix: its one output is what the classifier says there.
    prefixes = np.stack([model(features[None, :stop]).numpy()[0]
                         for stop in range(1, len(features) + 1)])
    np.testing.assert_allclose(outputs, prefixes, atol=1e-5)
    _, whole_states = keras_whole_sequence(path)(features)
    for got, want in zip(states, whole_states, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_graph_model_pipeline_over_chunked_runs_on_two_workers(tmp_path):
    inputs = keras.Input((None, INPUT_DIM))
    conv = L.Conv1D(4, 3, padding="causal", dilation_rate=2)(inputs)
    first = L.LSTM(4, return_sequences=True)(L.Concatenate()([conv, inputs]))
    normalized = L.LayerNormalization()(L.Add()([first, conv]))
    outputs = L.Dense(2)(L.GRU(3, return_sequences=True)(normalized))
    path = str(tmp_path / "graph.keras")
    randomized(keras.Model(inputs, outputs)).save(path)
    whole = {f"seq-{n}": features_for("plain", steps=steps, seed=n)
             for n, steps in enumerate([47, 1, 12, 30, 2])}

    state, _ = run_chunked(path, whole, tmp_path, beam_args=TWO_WORKERS)

    reference = keras_whole_sequence(path)
    worst = assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))
    print(f"max abs diff vs Keras, graph with a causal convolution, 3 chunked runs on two "
          f"workers: {worst:.3g}")


def test_graph_model_exported_as_a_step_savedmodel(tmp_path):
    model = graph_model("causal_conv")
    stack = load_model(export_step_savedmodel(model, str(tmp_path / "step")))
    assert stack.format == "savedmodel"
    assert stack.state_names == load_model_from(model).state_names
    features = features_for("plain", steps=30, seed=2)
    outputs, _ = run_in_chunks(stack, features)
    np.testing.assert_allclose(outputs, model(features[None]).numpy()[0], atol=1e-5)


def test_graph_model_from_a_tf_train_checkpoint(tmp_path):
    model = graph_model("skip_connections", seed=1)
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt" / "model"))
    skeleton = str(tmp_path / "skeleton.keras")
    graph_model("skip_connections", seed=2).save(skeleton)
    same = str(tmp_path / "same.keras")
    model.save(same)
    stack = load_model(prefix, ModelOptions(architecture=skeleton))
    assert stack.fingerprint == load_model(same).fingerprint
    features = features_for("plain", seed=4)
    outputs, _ = run_in_chunks(stack, features)
    np.testing.assert_allclose(outputs, model(features[None]).numpy()[0], atol=1e-5)


def test_simple_rnn_from_a_tf_train_checkpoint(tmp_path):
    model = randomized(keras.Sequential([keras.Input((None, INPUT_DIM)),
                                         L.SimpleRNN(5, return_sequences=True), L.Dense(2)]))
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt" / "model"))
    architecture = tmp_path / "architecture.json"
    architecture.write_text(model.to_json())
    stack = load_model(prefix, ModelOptions(architecture=str(architecture)))
    features = features_for("plain", seed=6)
    assert_close(*run_in_chunks(stack, features),
                 *keras_whole_sequence(model)(features))


def test_fingerprint_follows_the_computation_not_how_the_model_was_written():
    rng_weights = randomized(keras.Sequential([keras.Input((None, INPUT_DIM)),
                                               L.LSTM(4, return_sequences=True),
                                               L.Dense(2)])).get_weights()
    sequential = keras.Sequential([keras.Input((None, INPUT_DIM)),
                                   L.LSTM(4, return_sequences=True), L.Dense(2)])
    inputs = keras.Input((None, INPUT_DIM))
    functional = keras.Model(inputs, L.Dense(2)(L.LSTM(4, return_sequences=True)(inputs)))
    skip = keras.Model(inputs, L.Dense(2)(L.Add()([L.LSTM(4, return_sequences=True)(inputs),
                                                   L.Dense(4)(inputs)])))
    for model in (sequential, functional):
        model.set_weights(rng_weights)
    chain = load_model_from(sequential)
    assert chain.describe().keys() == {"recurrent", "head"}  # as before graphs existed
    assert load_model_from(functional).fingerprint == chain.fingerprint
    assert load_model_from(skip).fingerprint != chain.fingerprint


def refused(inputs, outputs):
    with pytest.raises(ModelError) as error:
        load_model_from(keras.Model(inputs, outputs))
    return str(error.value)


def test_graphs_that_cannot_run_on_chunks_are_refused_with_a_reason():
    inputs = keras.Input((None, INPUT_DIM))
    masked = L.Masking(MASK_VALUE)(inputs)
    assert "reads the model's input beside its masking layer" in refused(
        inputs, L.Concatenate()([L.LSTM(3, return_sequences=True)(masked),
                                 L.Dense(2)(inputs)]))
    assert "causal convolution after an input mask" in refused(
        inputs, L.Conv1D(2, 2, padding="causal")(masked))
    _, h, _ = L.LSTM(3, return_sequences=True, return_state=True)(inputs)
    assert "only a layer's first output" in refused(inputs, L.Dense(2)(h))
    assert "padding='same'" in refused(inputs, L.Conv1D(2, 3, padding="same")(inputs))
    fixed = keras.Input((10, INPUT_DIM))
    assert "only the feature axis" in refused(
        fixed, L.LayerNormalization(axis=1)(L.LSTM(3, return_sequences=True)(fixed)))
    with pytest.raises(ModelError, match="no recurrent layer found"):
        load_model_from(keras.Model(inputs, L.Dense(2)(inputs)))


def test_a_kernel_compiles_graphs_with_xla_and_without_the_same(tmp_path):
    stack = load_model_from(graph_model("causal_conv"))
    features = features_for("plain", steps=40, seed=8)[None].repeat(3, axis=0)
    lengths = np.array([40, 13, 1])
    states = [np.zeros((3, size), np.float32) for size in stack.state_sizes]
    xla = StepKernel(stack, window_steps=16, xla=True)
    plain = StepKernel(stack, window_steps=16, xla=False)
    assert xla.xla and not plain.xla
    for got, want in zip(xla.run(features, lengths, states)[1],
                         plain.run(features, lengths, states)[1]):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_classifier_exported_as_a_step_savedmodel_stays_a_classifier(tmp_path):
    model = randomized(keras.Sequential([
        keras.Input((None, INPUT_DIM)), L.GRU(5, return_sequences=True), L.LSTM(4),
        L.Dense(3, activation="softmax")]))
    stack = load_model(export_step_savedmodel(model, str(tmp_path / "step")))
    assert stack.format == "savedmodel" and stack.sequence_output is False
    features = features_for("plain", steps=12, seed=9)
    outputs, _ = run_in_chunks(stack, features, (0, 1, 5, 12))
    prefixes = np.stack([model(features[None, :stop]).numpy()[0]
                         for stop in range(1, len(features) + 1)])
    np.testing.assert_allclose(outputs, prefixes, atol=1e-5)
    sequences = load_model(export_step_savedmodel(graph_model("causal_conv"),
                                                  str(tmp_path / "sequences")))
    assert sequences.sequence_output is True


def test_a_model_used_as_a_layer_is_opened_up(tmp_path):
    encoder = keras.Sequential([keras.Input((None, INPUT_DIM)), L.Masking(MASK_VALUE),
                                L.LSTM(4, return_sequences=True), L.LayerNormalization()])
    inputs = keras.Input((None, INPUT_DIM))
    encoded = encoder(inputs)
    outputs = L.Dense(2)(L.Concatenate()([encoded, L.GRU(3, return_sequences=True)(encoded)]))
    model = randomized(keras.Model(inputs, outputs))
    path = str(tmp_path / "nested.keras")
    model.save(path)
    stack = load_model(path)
    assert [layer.kind for layer in stack.layers] == [
        "lstm", "layer_norm", "gru", "merge", "dense"]
    features = features_for("masking")
    outputs, states = run_in_chunks(stack, features)
    np.testing.assert_allclose(outputs, model(features[None]).numpy()[0], atol=1e-5)
    assert_close(outputs, states, *keras_whole_sequence(path)(features))

    block = keras.Sequential([keras.Input((None, INPUT_DIM)), L.Dense(INPUT_DIM)])
    assert "be called once" in refused(
        inputs, L.LSTM(2, return_sequences=True)(block(block(inputs))))


def test_a_per_step_layer_called_twice_is_two_layers_with_the_same_weights():
    inputs = keras.Input((None, INPUT_DIM))
    norm, dense = L.LayerNormalization(), L.Dense(4, activation="tanh")
    first = L.LSTM(4, return_sequences=True)(dense(norm(inputs)))
    second = L.GRU(4, return_sequences=True)(dense(norm(L.Dense(INPUT_DIM)(first))))
    model = randomized(keras.Model(inputs, L.Add()([first, second])))
    stack = load_model_from(model)
    assert [layer.kind for layer in stack.layers].count("layer_norm") == 2
    features = features_for("plain", seed=11)
    outputs, _ = run_in_chunks(stack, features)
    np.testing.assert_allclose(outputs, model(features[None]).numpy()[0], atol=1e-5)
