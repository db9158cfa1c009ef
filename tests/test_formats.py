"""Keras layers beyond LSTM, tf.train.Checkpoint and SavedModel files written by the
real frameworks, each against that framework's own whole-sequence output, chunked
through the kernel and through several pipeline runs; clear refusals."""
import keras
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf

from pipeline.build import run_job
from pipeline.options import RunConfig
from schemas import Chunk
from schemas.validation import INVALID_TOKEN_ID, validate_chunks
from tests.chunked import assert_equals_whole_sequence, run_chunked
from tests.conftest import IN_PROCESS
from tests.test_pipeline import write_chunks
from transforms.export import export_step_savedmodel
from transforms.kernel import StepKernel
from transforms.models import ModelError, ModelOptions, load_model
from transforms.reference import keras_whole_sequence

INPUT_DIM, VOCABULARY, MASK_VALUE = 3, 13, 0.5
CUTS = (0, 1, 9, 10, 31, 47)  # chunk boundaries, a one-step chunk among them


def randomized(model, seed=0):
    """``model`` with random non-zero weights (biases too)."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    return model


def keras_model(kind, seed=0, input_dim=INPUT_DIM):
    """The Keras models of these tests, by name."""
    L = keras.layers
    float_input, id_input = keras.Input((None, input_dim)), keras.Input((None,), dtype="int32")
    layers = {
        "gru_both_modes": [float_input, L.GRU(5, return_sequences=True),
                           L.GRU(4, return_sequences=True, reset_after=False,
                                 activation="relu", recurrent_activation="hard_sigmoid"),
                           L.LSTM(3, return_sequences=True), L.Dense(2)],
        "masking": [float_input, L.Masking(MASK_VALUE), L.LSTM(5, return_sequences=True),
                    L.Dropout(0.5), L.GRU(4, return_sequences=True),
                    L.Dense(2, activation="tanh")],
        "embedding_mask_zero": [id_input, L.Embedding(VOCABULARY, 4, mask_zero=True),
                                L.GRU(5, return_sequences=True),
                                L.TimeDistributed(L.Dense(3))],
        "embedding": [id_input, L.Embedding(VOCABULARY, 4),
                      L.LSTM(5, return_sequences=True, use_bias=False), L.Dense(2)],
        "simple_rnn": [float_input, L.SimpleRNN(6, return_sequences=True),
                       L.SimpleRNN(4, return_sequences=True, activation="relu",
                               use_bias=False),
                       L.GRU(3, return_sequences=True), L.Dense(2)],
    }[kind]
    return randomized(keras.Sequential(layers), seed)


def features_for(kind, steps=47, seed=1):
    """A whole sequence for a model: token ids [steps, 1] for embeddings; floats with
    masked steps (at the start, inside, at a chunk boundary) for masking."""
    rng = np.random.default_rng(seed)
    if kind.startswith("embedding"):
        ids = rng.integers(0, VOCABULARY, (steps, 1)).astype(np.float32)
        ids[[i for i in (0, 9, 10, 20) if i < steps]] = 0  # masked with mask_zero
        return ids
    features = rng.normal(size=(steps, INPUT_DIM)).astype(np.float32)
    if kind == "masking":
        features[[i for i in (0, 1, 9, 10, 11, 30, 31) if i < steps]] = MASK_VALUE
    return features


def run_in_chunks(stack, features, cuts=CUTS):
    """The kernel over ``features`` cut at ``cuts``, state carried between calls."""
    kernel = StepKernel(stack, window_steps=7)
    states, outputs = [s[None] for s in stack.zero_state()], []
    for start, stop in zip(cuts, cuts[1:]):
        piece, states = kernel.run(features[None, start:stop], np.array([stop - start]),
                                   states)
        outputs.append(piece[0])
    return np.concatenate(outputs), [s[0] for s in states]


def assert_close(got_outputs, got_states, want_outputs, want_states):
    np.testing.assert_allclose(got_outputs, want_outputs, atol=1e-5)
    for got, want in zip(got_states, want_states, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    return max([float(np.abs(got_outputs - want_outputs).max())]
               + [float(np.abs(g - w).max()) for g, w in zip(got_states, want_states)])


# --- Keras -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gru_both_modes", "masking", "embedding_mask_zero",
                                  "embedding", "simple_rnn"])
def test_keras_layers_in_chunks_match_keras_on_the_whole_sequence(tmp_path, kind):
    path = str(tmp_path / f"{kind}.keras")
    model = keras_model(kind)
    model.save(path)
    stack = load_model(path)
    features = features_for(kind)

    outputs, states = run_in_chunks(stack, features)

    keras_input = features[None, :, 0].astype(np.int32) if kind.startswith(
        "embedding") else features[None]
    np.testing.assert_allclose(outputs, model(keras_input).numpy()[0], atol=1e-5)
    worst = assert_close(outputs, states, *keras_whole_sequence(path)(features))
    print(f"max abs diff vs Keras ({kind}): {worst:.3g}")


def test_simple_rnn_pipeline_over_chunked_runs(tmp_path):
    path = str(tmp_path / "simple_rnn.keras")
    keras_model("simple_rnn").save(path)
    whole = {f"seq-{n}": features_for("simple_rnn", steps=steps, seed=n)
             for n, steps in enumerate([47, 1, 12, 30])}
    state, _ = run_chunked(path, whole, tmp_path)
    reference = keras_whole_sequence(path)
    worst = assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))
    print(f"max abs diff vs Keras, SimpleRNN, 3 chunked runs: {worst:.3g}")


def test_keras_pipeline_over_chunked_runs_with_masked_steps(tmp_path):
    path = str(tmp_path / "masking.keras")
    keras_model("masking").save(path)
    whole = {f"seq-{n}": features_for("masking", steps=steps, seed=n)
             for n, steps in enumerate([47, 1, 12, 30, 60, 8])}
    state, _ = run_chunked(path, whole, tmp_path)
    reference = keras_whole_sequence(path)
    worst = assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))
    print(f"max abs diff vs Keras, masking, 3 chunked runs: {worst:.3g}")


def test_embedding_pipeline_over_chunked_runs_and_bad_token_ids(tmp_path):
    path = str(tmp_path / "embedding.keras")
    keras_model("embedding_mask_zero").save(path)
    whole = {f"seq-{n}": features_for("embedding_mask_zero", steps=steps, seed=n)
             for n, steps in enumerate([40, 1, 25])}
    state, _ = run_chunked(path, whole, tmp_path)
    reference = keras_whole_sequence(path)
    worst = assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))
    print(f"max abs diff vs Keras, embedding, 3 chunked runs: {worst:.3g}")
    bad = write_chunks(tmp_path / "bad", [Chunk("seq-0", 99, np.array([[13.0]], np.float32))])
    report = run_job(RunConfig(path, bad, state, str(tmp_path / "outputs"), run_id="bad"),
                     IN_PROCESS)
    assert report["chunks_rejected_by_reason"] == {INVALID_TOKEN_ID: 1}


def test_gru_fingerprint_depends_on_reset_after(tmp_path):
    fingerprints = set()
    for reset_after in (True, False):
        model = randomized(keras.Sequential([keras.Input((None, INPUT_DIM)), keras.layers.GRU(
            4, return_sequences=True, reset_after=reset_after)]))
        model.save(str(tmp_path / f"{reset_after}.keras"))
        fingerprints.add(load_model(str(tmp_path / f"{reset_after}.keras")).fingerprint)
    assert len(fingerprints) == 2


@pytest.mark.parametrize("layers, message", [
    ([keras.layers.Bidirectional(keras.layers.GRU(3, return_sequences=True))],
     "of type Bidirectional is not supported: it is not causal"),
    ([keras.layers.LSTM(3, return_sequences=True), keras.layers.Masking()],
     "of type Masking must be the model's first layer"),
    ([keras.layers.Masking(), keras.layers.GRU(3, return_sequences=True,
                                               zero_output_for_mask=True)],
     "zero_output_for_mask=True"),
    ([keras.layers.Conv1D(3, 2)], "of type Conv1D has padding='valid'"),
    ([keras.layers.Conv1D(3, 2, padding="causal", strides=2)], "must have strides=1"),
])
def test_unsupported_keras_layers_are_refused(tmp_path, layers, message):
    path = str(tmp_path / "bad.keras")
    keras.Sequential([keras.Input((None, INPUT_DIM)), *layers]).save(path)
    with pytest.raises(ModelError, match=message):
        load_model(path)


def test_attention_over_the_whole_sequence_is_refused(tmp_path):
    inputs = keras.Input((None, INPUT_DIM))
    sequence = keras.layers.LSTM(4, return_sequences=True)(inputs)
    attended = keras.layers.MultiHeadAttention(2, 2)(sequence, sequence)
    path = str(tmp_path / "attention.keras")
    keras.Model(inputs, attended).save(path)
    with pytest.raises(ModelError, match="MultiHeadAttention is not supported: it is not causal"):
        load_model(path)


def test_token_ids_are_validated_when_read():
    table = pa.table({"sequence_id": ["ok", "fraction", "negative", "too-big"],
                      "chunk_index": [0, 0, 0, 0],
                      "features": [[[0.0], [12.0]], [[1.5]], [[-1.0]], [[13.0]]]})
    chunks, letters = validate_chunks(table, "f.parquet", input_dim=1, vocabulary=VOCABULARY)
    assert [c.sequence_id for c in chunks] == ["ok"]
    assert [(d.sequence_id, d.reason) for d in letters] == [
        ("fraction", INVALID_TOKEN_ID), ("negative", INVALID_TOKEN_ID),
        ("too-big", INVALID_TOKEN_ID)]
    assert "[0, 13)" in letters[0].message


# --- tf.train.Checkpoint of a Keras model ------------------------------------------

@pytest.fixture
def object_checkpoint(tmp_path):
    """A trained-looking Keras model saved with tf.train.Checkpoint (with an optimizer,
    as training code does), and its architecture as a .keras skeleton with other
    weights and as JSON."""
    model = keras_model("gru_both_modes", seed=3)
    prefix = tf.train.Checkpoint(model=model, optimizer=keras.optimizers.Adam()).write(
        str(tmp_path / "ckpt" / "model"))
    skeleton = str(tmp_path / "skeleton.keras")
    keras_model("gru_both_modes", seed=4).save(skeleton)
    config = tmp_path / "architecture.json"
    config.write_text(model.to_json())
    model.save(str(tmp_path / "same.keras"))
    return prefix, skeleton, str(config), str(tmp_path / "same.keras")


def restored_by_tensorflow(prefix, architecture):
    """The oracle: TensorFlow's own restore of the checkpoint into the architecture."""
    model = keras.models.model_from_json(open(architecture).read())
    tf.train.Checkpoint(model=model).read(prefix).expect_partial()
    return model


def test_object_checkpoint_with_architecture_matches_tensorflow_restore(object_checkpoint):
    prefix, skeleton, config, same = object_checkpoint
    reference = keras_whole_sequence(restored_by_tensorflow(prefix, config))
    features = features_for("gru_both_modes")
    for architecture in (skeleton, config):
        stack = load_model(prefix, ModelOptions(architecture=architecture))
        assert stack.format == "tf-checkpoint"
        # Same weights as the .keras file of the model that was saved: same fingerprint.
        assert stack.fingerprint == load_model(same).fingerprint
        worst = assert_close(*run_in_chunks(stack, features), *reference(features))
    print(f"max abs diff vs TensorFlow restore + Keras: {worst:.3g}")


def test_object_checkpoint_pipeline_over_chunked_runs(object_checkpoint, tmp_path):
    prefix, skeleton, config, _ = object_checkpoint
    reference = keras_whole_sequence(restored_by_tensorflow(prefix, config))
    whole = {f"seq-{n}": features_for("gru", steps=steps, seed=n)
             for n, steps in enumerate([47, 1, 20, 33])}
    state, _ = run_chunked(prefix, whole, tmp_path, model_architecture=skeleton)
    worst = assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))
    print(f"max abs diff vs TensorFlow restore + Keras, 3 chunked runs: {worst:.3g}")


def test_object_checkpoint_errors_are_clear(object_checkpoint, tmp_path):
    prefix, _, _, _ = object_checkpoint
    with pytest.raises(ModelError, match="is a tf.train.Checkpoint.*--model-architecture"):
        load_model(prefix)
    bigger = keras_model("gru_both_modes")
    bigger.add(keras.layers.Dense(4))
    bigger.save(str(tmp_path / "bigger.keras"))
    with pytest.raises(ModelError, match="missing variable.*dense.*kernel"):
        load_model(prefix, ModelOptions(architecture=str(tmp_path / "bigger.keras")))
    wider = keras_model("gru_both_modes", input_dim=INPUT_DIM + 1)
    wider.save(str(tmp_path / "wider.keras"))
    with pytest.raises(ModelError, match="does not fit the architecture.*shape"):
        load_model(prefix, ModelOptions(architecture=str(tmp_path / "wider.keras")))


# --- SavedModel with a step signature ----------------------------------------------

def savedmodel_whole_sequence(directory):
    """The oracle: the SavedModel's own step signature, called by TensorFlow step by
    step over the whole sequence from zero states."""
    step = tf.saved_model.load(directory).signatures["step"]
    states = {name: tf.zeros([1, spec.shape[1]])
              for name, spec in step.structured_input_signature[1].items() if name != "x"}

    def whole_sequence(features):
        current, outputs = dict(states), []
        for x in features:
            result = step(x=tf.constant(x[None]), **current)
            outputs.append(result.pop("outputs").numpy()[0])
            current = result
        return np.stack(outputs), [current[name].numpy()[0] for name in sorted(current)]

    return whole_sequence


@pytest.mark.parametrize("kind", ["gru_both_modes", "embedding", "simple_rnn"])
def test_exported_savedmodel_runs_as_a_step_function(tmp_path, kind):
    path = str(tmp_path / f"{kind}.keras")
    keras_model(kind).save(path)
    directory = export_step_savedmodel(path, str(tmp_path / "savedmodel"))
    stack = load_model(directory)
    assert stack.format == "savedmodel"
    assert stack.input_dim == (1 if kind == "embedding" else INPUT_DIM)
    features = features_for(kind)
    outputs, states = run_in_chunks(stack, features)
    worst = assert_close(outputs, states, *savedmodel_whole_sequence(directory)(features))
    # The export itself is Keras' computation: the outputs equal the .keras file's.
    np.testing.assert_allclose(outputs, keras_whole_sequence(path)(features)[0], atol=1e-5)
    print(f"max abs diff vs the SavedModel's own steps ({kind}): {worst:.3g}")


def test_savedmodel_pipeline_over_chunked_runs(tmp_path):
    path = str(tmp_path / "m.keras")
    keras_model("gru_both_modes").save(path)
    directory = export_step_savedmodel(path, str(tmp_path / "savedmodel"))
    reference = savedmodel_whole_sequence(directory)
    whole = {f"seq-{n}": features_for("gru", steps=steps, seed=n)
             for n, steps in enumerate([30, 1, 12])}
    state, _ = run_chunked(directory, whole, tmp_path)
    worst = assert_equals_whole_sequence(state, whole, lambda _, features: reference(features))
    print(f"max abs diff vs the SavedModel's own steps, 3 chunked runs: {worst:.3g}")


def test_savedmodel_fingerprint_follows_its_variables(tmp_path):
    model = keras_model("gru_both_modes")
    first = load_model(export_step_savedmodel(model, str(tmp_path / "a")))
    again = load_model(export_step_savedmodel(model, str(tmp_path / "b")))
    other = load_model(export_step_savedmodel(keras_model("gru_both_modes", seed=9),
                                              str(tmp_path / "c")))
    assert first.fingerprint == again.fingerprint != other.fingerprint
    model.save(str(tmp_path / "m.keras"))
    # A black box: not the fingerprint of the same weights in Keras (see README).
    assert first.fingerprint != load_model(str(tmp_path / "m.keras")).fingerprint


def hand_written_step_savedmodel(directory, state_name):
    """A SavedModel not from Keras: a moving average with a learned rate, as a step."""
    module = tf.Module()
    module.rate = tf.Variable([0.3, 0.7, 0.9])

    @tf.function(input_signature=[tf.TensorSpec([None, INPUT_DIM], tf.float32, name="x"),
                                  tf.TensorSpec([None, INPUT_DIM], tf.float32,
                                                name=state_name)])
    def step(x, state):
        new = module.rate * state + (1.0 - module.rate) * x
        return {"outputs": tf.tanh(new), state_name: new}

    tf.saved_model.save(module, directory, signatures={"step": step})
    return directory


def test_any_savedmodel_with_a_step_signature_runs(tmp_path):
    directory = hand_written_step_savedmodel(str(tmp_path / "ema"), "layer0_average")
    stack = load_model(directory)
    assert stack.state_names == ("layer0_average",) and stack.state_sizes == (INPUT_DIM,)
    features = features_for("gru")
    worst = assert_close(*run_in_chunks(stack, features),
                         *savedmodel_whole_sequence(directory)(features))
    print(f"max abs diff vs a hand-written SavedModel's own steps: {worst:.3g}")
    with pytest.raises(ModelError, match="state 'average' must be named layer<K>_<part>"):
        load_model(hand_written_step_savedmodel(str(tmp_path / "bad"), "average"))


def test_savedmodel_errors_are_clear(tmp_path):
    model = keras_model("gru_both_modes")
    model.export(str(tmp_path / "serving"), verbose=False)  # a whole-sequence signature
    with pytest.raises(ModelError, match="has no 'step' signature.*export_step_savedmodel"):
        load_model(str(tmp_path / "serving"))
    with pytest.raises(ModelError, match="input mask cannot be exported"):
        export_step_savedmodel(keras_model("masking"), str(tmp_path / "masked"))


# --- directories and checkpoint prefixes on gs:// -----------------------------------

def test_directory_and_prefix_models_load_from_gcs(bucket, tmp_path, tf1_checkpoints):
    import gcsfs

    path = str(tmp_path / "m.keras")
    keras_model("gru_both_modes").save(path)
    local = {"savedmodel": export_step_savedmodel(path, str(tmp_path / "savedmodel")),
             "tf1": str(tf1_checkpoints / "gru_stack" / "model.ckpt"),
             "tf1-directory": str(tf1_checkpoints / "seed_style")}
    fs = gcsfs.GCSFileSystem(token="anon")
    fs.put(local["savedmodel"], f"{bucket}/models/savedmodel", recursive=True)
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        fs.put(str(tf1_checkpoints / "gru_stack" / name), f"{bucket}/models/tf1/{name}")
    # The seed's way: a directory whose `checkpoint` file names the latest checkpoint
    # by an absolute path, here of the machine it was trained on.
    fs.put(local["tf1-directory"], f"{bucket}/models/seed", recursive=True)
    fs.pipe(f"{bucket}/models/seed/checkpoint",
            b'model_checkpoint_path: "/home/someone/checkpoint_dir/model.ckpt"\n')
    options = ModelOptions(tf1_forget_bias=0.25)
    for kind, remote in [("savedmodel", f"{bucket}/models/savedmodel"),
                         ("tf1", f"{bucket}/models/tf1/model.ckpt"),
                         ("tf1-directory", f"{bucket}/models/seed")]:
        assert load_model(remote, options).fingerprint == load_model(local[kind],
                                                                     options).fingerprint
    with pytest.raises(ModelError, match="does not exist"):
        load_model(f"{bucket}/models/tf1/nothing.ckpt")


def test_model_options_from_the_command_line():
    options = ModelOptions.from_arguments("a.json", ["enc/rnn=rnn", "/x/y/=z"], 0.5)
    assert options == ModelOptions("a.json", (("enc/rnn", "rnn"), ("x/y", "z")), 0.5)
    with pytest.raises(ModelError, match="must be OLD=NEW"):
        ModelOptions.from_arguments(None, ["no-equals-sign"])
