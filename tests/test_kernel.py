"""The batched masked kernel against the independent float64 numpy LSTM."""
import numpy as np
import pytest

from tests.oracle import numpy_lstm
from transforms.kernel import XLA_ENV, StepKernel, batch_bucket, window_width
from transforms.models import DenseLayer, LSTMLayer, RecurrentStack

INPUT_DIM = 5


def random_stack(rng, units=(7, 6), output_dim=3):
    layers, width = [], INPUT_DIM
    for u in units:
        layers.append(LSTMLayer(rng.normal(0, 0.5, (width, 4 * u)).astype(np.float32),
                                rng.normal(0, 0.5, (u, 4 * u)).astype(np.float32),
                                rng.normal(0, 0.3, 4 * u).astype(np.float32)))
        width = u
    head = (DenseLayer(rng.normal(0, 0.5, (width, output_dim)).astype(np.float32),
                       rng.normal(0, 0.3, output_dim).astype(np.float32)),) if output_dim else ()
    return RecurrentStack(tuple(layers) + head, source="test")


def oracle_weights(stack):
    return ([(l.kernel, l.recurrent_kernel, l.bias) for l in stack.recurrent],
            [(d.kernel, d.bias) for d in stack.layers if isinstance(d, DenseLayer)])


@pytest.mark.parametrize("xla", [True, False], ids=["xla", "plain"])
@pytest.mark.parametrize("window_steps", [1, 4, 1000])
def test_ragged_masked_batch_matches_numpy_for_every_row(window_steps, xla):
    rng = np.random.default_rng(1)
    stack = random_stack(rng)
    kernel = StepKernel(stack, window_steps=window_steps, xla=xla)
    lengths = np.array([1, 13, 7, 0, 2, 13])
    # Padding is noise, not zeros: only masking can keep it out of the state.
    inputs = rng.normal(size=(len(lengths), 13, INPUT_DIM)).astype(np.float32)
    initial = [rng.normal(0, 0.5, (len(lengths), size)).astype(np.float32)
               for size in stack.state_sizes]

    outputs, final = kernel.run(inputs, lengths, initial)

    layers, head = oracle_weights(stack)
    for row, length in enumerate(lengths):
        start = [(initial[2 * k][row], initial[2 * k + 1][row]) for k in range(len(layers))]
        expected, expected_states = numpy_lstm(inputs[row, :length], layers, head, start)
        np.testing.assert_allclose(outputs[row, :length], expected, atol=1e-5)
        for k, (h, c) in enumerate(expected_states):
            np.testing.assert_allclose(final[2 * k][row], h, atol=1e-5)
            np.testing.assert_allclose(final[2 * k + 1][row], c, atol=1e-5)
    # A row with no real step keeps its state bit for bit.
    for part, start in zip(final, initial):
        np.testing.assert_array_equal(part[3], start[3])


def test_without_head_outputs_are_last_layer_h():
    rng = np.random.default_rng(2)
    stack = random_stack(rng, units=(4,), output_dim=None)
    inputs = rng.normal(size=(2, 6, INPUT_DIM)).astype(np.float32)
    outputs, final = StepKernel(stack).run(inputs, np.array([6, 6]),
                                           [np.zeros((2, 4), np.float32)] * 2)
    expected, _ = numpy_lstm(inputs[1], *oracle_weights(stack))
    np.testing.assert_allclose(outputs[1], expected, atol=1e-5)
    np.testing.assert_allclose(final[0][1], expected[-1], atol=1e-5)


def test_state_carried_between_calls_equals_one_whole_call():
    rng = np.random.default_rng(3)
    stack = random_stack(rng)
    kernel = StepKernel(stack, window_steps=8)
    inputs = rng.normal(size=(3, 30, INPUT_DIM)).astype(np.float32)
    lengths = np.array([30, 30, 30])
    zeros = [np.zeros((3, size), np.float32) for size in stack.state_sizes]
    whole, whole_state = kernel.run(inputs, lengths, zeros)
    states, pieces = zeros, []
    for start, stop in [(0, 1), (1, 12), (12, 13), (13, 30)]:
        piece, states = kernel.run(inputs[:, start:stop], np.full(3, stop - start), states)
        pieces.append(piece)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, atol=1e-6)
    for got, want in zip(states, whole_state):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_compiled_shapes_stay_few_whatever_the_batch_and_window_shapes():
    rng = np.random.default_rng(4)
    stack = random_stack(rng)
    kernel = StepKernel(stack, window_steps=16, shards=1)
    for batch in range(1, 41):
        steps = int(rng.integers(1, 50))
        kernel.run(rng.normal(size=(batch, steps, INPUT_DIM)).astype(np.float32),
                   rng.integers(0, steps + 1, batch),
                   [np.zeros((batch, size), np.float32) for size in stack.state_sizes])
    # 40 batch sizes and random lengths: ten batch buckets (8, 10, 12, 14, 16, 20, 24,
    # 28, 32, 40), one window width (16: partial windows are padded to it).
    assert kernel.compiled_shapes == {
        (1, rows, 16) for rows in (8, 10, 12, 14, 16, 20, 24, 28, 32, 40)}
    assert kernel.traces == len(kernel.compiled_shapes)


def test_buckets_pad_at_most_a_quarter():
    assert [batch_bucket(n) for n in (1, 8, 9, 17, 64, 65, 100, 256, 257)] == \
        [8, 8, 10, 20, 64, 80, 112, 256, 320]
    assert all(batch_bucket(n) <= max(8, n * 1.25) for n in range(1, 3000))
    assert [window_width(n, 256) for n in (1, 16, 17, 200, 256, 300)] == \
        [16, 16, 32, 256, 256, 256]


def test_shards_run_a_batch_in_slices_with_the_same_results():
    rng = np.random.default_rng(5)
    stack = random_stack(rng)
    inputs = rng.normal(size=(150, 9, INPUT_DIM)).astype(np.float32)
    lengths = rng.integers(0, 10, 150)
    zeros = [np.zeros((150, size), np.float32) for size in stack.state_sizes]
    one, one_state = StepKernel(stack, shards=1).run(inputs, lengths, zeros)
    sharded = StepKernel(stack, shards=2)
    two, two_state = sharded.run(inputs, lengths, zeros)
    assert sharded.compiled_shapes == {(2, 80, 16)}
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(two[row, :length], one[row, :length], atol=1e-6)
    for a, b in zip(two_state, one_state):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_xla_can_be_turned_off_or_on_for_every_work_by_the_environment(monkeypatch):
    monkeypatch.setenv(XLA_ENV, "0")
    assert StepKernel(random_stack(np.random.default_rng(6))).xla is False
    monkeypatch.setenv(XLA_ENV, "1")
    kernel = StepKernel(random_stack(np.random.default_rng(6)))
    assert kernel.xla is True and kernel.xla_for_small_works
    monkeypatch.delenv(XLA_ENV)
    kernel = StepKernel(random_stack(np.random.default_rng(6)))
    assert kernel.xla is True and not kernel.xla_for_small_works
    assert StepKernel(random_stack(np.random.default_rng(6)), xla=True).xla_for_small_works


def test_a_model_xla_cannot_compile_runs_plain_decided_once_by_its_first_window(caplog):
    """A step XLA has no kernels for (a round trip through text): the kernel finds out
    at its first window, says so once, runs that window and every later one plain."""
    import tensorflow as tf

    from transforms.models import StepFunctionLayer

    @tf.function
    def through_text(x, h):
        total = tf.strings.to_number(tf.strings.as_string(x + h))
        return {"outputs": total, "h": total}

    layer = StepFunctionLayer(through_text, input_dim=2, output_dim=2, names=("h",),
                              state_sizes=(2,), variables_sha256="none")
    stack = RecurrentStack((layer,), source="test")
    kernel = StepKernel(stack, window_steps=8, xla=True)
    assert kernel.traces == 0  # nothing compiled until a window needs it
    steps = np.arange(1, 21, dtype=np.float32).reshape(1, 10, 2)
    with caplog.at_level("WARNING", logger="seqcarry"):
        for _ in range(2):
            outputs, (h,) = kernel.run(steps, np.array([10]), [np.zeros((1, 2), np.float32)])
            np.testing.assert_array_equal(outputs[0], np.cumsum(steps[0], axis=0))
            np.testing.assert_array_equal(h[0], steps[0].sum(axis=0))
    assert kernel.xla is False
    assert [r.getMessage().split()[0] for r in caplog.records
            if r.name == "seqcarry"] == ["event=xla_unavailable"]
    # Read first, ``xla`` decides by compiling the smallest shape.
    with caplog.at_level("WARNING", logger="seqcarry"):
        assert StepKernel(stack, window_steps=8, xla=True).xla is False
    assert StepKernel(random_stack(np.random.default_rng(7)), xla=True).xla is True
