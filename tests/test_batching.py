"""Continuous batching (``transforms.sequencing.run_continuous``) on the real kernel:
every sequence equals the float64 numpy LSTM on its own, whatever else shares its
batch, the schedule is deterministic, and a long sequence among short ones costs
about what it costs alone."""
import numpy as np
import pytest

from schemas import CarriedState, Chunk
from tests.oracle import numpy_lstm
from tests.test_kernel import INPUT_DIM, oracle_weights, random_stack
from transforms.kernel import StepKernel
from transforms.sequencing import (XLA_MIN_WINDOWS, SequenceWork, batch_capacity, run_batch,
                                   run_continuous, uses_xla)


def works_of(rng, stack, lengths):
    """One SequenceWork per length: ragged chunks (one-step ones included) and a
    random carried state."""
    works = []
    for number, steps in enumerate(lengths):
        features = rng.normal(size=(steps, INPUT_DIM)).astype(np.float32)
        cuts = np.sort(rng.choice(np.arange(1, steps), min(steps - 1, 3), replace=False)) \
            if steps > 1 else []
        pieces = np.split(features, cuts)
        carried = CarriedState(f"s{number:03d}", 2, 10, tuple(
            rng.normal(0, 0.5, size).astype(np.float32) for size in stack.state_sizes), "fp")
        works.append(SequenceWork(carried, tuple(
            Chunk(carried.sequence_id, 2 + index, piece) for index, piece in enumerate(pieces))))
    return works


def expected(stack, work):
    layers, head = oracle_weights(stack)
    tensors = work.carried.tensors
    start = [(tensors[2 * k], tensors[2 * k + 1]) for k in range(len(layers))]
    features = np.concatenate([chunk.features for chunk in work.chunks])
    return numpy_lstm(features, layers, head, start)


@pytest.mark.parametrize("slots", [1, 3, 8, 64])
def test_every_sequence_equals_itself_alone_whatever_shares_its_rows(slots):
    rng = np.random.default_rng(11)
    stack = random_stack(rng)
    kernel = StepKernel(stack, window_steps=16)
    works = works_of(rng, stack, [1, 1, 2, 150, 17, 1, 40, 16, 33, 1, 5, 90])
    results = list(run_continuous(kernel, works, slots))
    # A result once `slots` sequences have finished (more when several finish in
    # the same window), and one for the rest.
    assert all(len(r.states) >= slots for r in results[:-1])
    assert sum(len(r.states) for r in results) == len(works)
    outputs = {(o.sequence_id, o.chunk_index): o.outputs for r in results for o in r.outputs}
    states = {s.sequence_id: s for r in results for s in r.states}
    for work in works:
        want_outputs, want_states = expected(stack, work)
        got = np.concatenate([outputs[c.sequence_id, c.chunk_index] for c in work.chunks])
        np.testing.assert_allclose(got, want_outputs, atol=1e-5)
        state = states[work.carried.sequence_id]
        assert (state.next_chunk_index, state.steps_seen) == (
            work.chunks[-1].chunk_index + 1, 10 + work.steps)
        for k, (h, c) in enumerate(want_states):
            np.testing.assert_allclose(state.tensors[2 * k], h, atol=1e-5)
            np.testing.assert_allclose(state.tensors[2 * k + 1], c, atol=1e-5)


def test_the_schedule_is_deterministic_and_compiles_few_shapes():
    rng = np.random.default_rng(12)
    stack = random_stack(rng)
    kernel = StepKernel(stack, window_steps=16)
    works = works_of(rng, stack, rng.integers(1, 120, 100))

    def bits(order):
        return {(o.sequence_id, o.chunk_index): o.outputs.tobytes()
                for r in run_continuous(kernel, order, 32) for o in r.outputs}

    assert bits(works) == bits(works[::-1])
    # 32 rows, or 16 or 8 once nothing waits (by halves, where that saves enough).
    assert {rows for _, rows, _ in kernel.compiled_shapes} <= {8, 16, 32}
    assert run_batch(kernel, works[:5]).steps == sum(w.steps for w in works[:5])


def test_a_long_sequence_among_short_ones_costs_about_what_it_costs_alone(monkeypatch):
    """Counted in rows x steps the kernel computes (padding included): one
    4,000-step sequence with 255 one-step ones, against it alone. Padding every row
    to the longest, as batches did before, would cost 32x."""
    rng = np.random.default_rng(13)
    stack = random_stack(rng, units=(4,))
    kernel = StepKernel(stack, window_steps=16)
    computed = []
    run_window = kernel.run_window

    def counted(inputs, lengths, states, rows=0, xla=True):
        shards, per_shard = kernel._layout(max(len(inputs), rows))
        computed.append(shards * per_shard * 16)
        return run_window(inputs, lengths, states, rows, xla)

    monkeypatch.setattr(kernel, "run_window", counted)
    works = works_of(rng, stack, [4000] + [1] * 255)
    results = list(run_continuous(kernel, works, 256))
    together, shapes = sum(computed), set(kernel.compiled_shapes)
    computed.clear()
    list(run_continuous(kernel, works[:1], 256))
    alone = sum(computed)
    # The short ones ride beside the long one in the rows it runs on alone: no wider
    # shape to compile, no extra row-steps.
    assert together == alone and shapes == kernel.compiled_shapes == {(1, 8, 16)}
    outputs = {(o.sequence_id, o.chunk_index): o.outputs for r in results for o in r.outputs}
    for work in works[:3]:
        got = np.concatenate([outputs[c.sequence_id, c.chunk_index] for c in work.chunks])
        np.testing.assert_allclose(got, expected(stack, work)[0], atol=1e-5)


def test_a_batch_takes_no_more_sequences_than_keep_the_longest_busy():
    padded = StepKernel(random_stack(np.random.default_rng(15)), shards=2).padded_rows
    assert batch_capacity([1024] * 2048, 256, padded) == 256  # equal lengths: every slot
    assert batch_capacity([64] * 100, 256, padded) == 112  # 100 rows pad to 112 anyway
    assert batch_capacity([60_000] + [1] * 255, 256, padded) == 8
    # 265,000 steps over a 10,000-step critical path: 27 rows, padded to 28.
    assert batch_capacity([10_000] + [1_000] * 255, 256, padded) == 28
    assert batch_capacity([], 256, padded) == 1


def test_the_last_few_sequences_of_a_bucket_do_not_compile_a_shape_of_their_own():
    """260 sequences of 64 steps on 256 rows: the last 4 run on the 256 rows already
    compiled (about 16,000 row-steps of padding) rather than on a new 8-row shape (a
    compile costs far more), and are as exact as the others."""
    rng = np.random.default_rng(14)
    stack = random_stack(rng, units=(4,))
    kernel = StepKernel(stack, window_steps=16)
    works = works_of(rng, stack, [64] * 260)
    outputs = {o.sequence_id: o.outputs for r in run_continuous(kernel, works, 256)
               for o in r.outputs}
    assert {rows * shards for shards, rows, _ in kernel.compiled_shapes} == {256}
    alone = {o.sequence_id: o.outputs for o in run_batch(kernel, works[-4:]).outputs}
    for sequence_id, expected in alone.items():
        np.testing.assert_allclose(outputs[sequence_id], expected, atol=1e-6)


def test_small_works_run_plain_large_ones_xla_and_both_equal_the_oracle(monkeypatch):
    """XLA's compile pays off only over many windows: continuous batching asks for it
    from XLA_MIN_WINDOWS windows on, decided from the work alone (the same work, the
    same path and bits), unless SEQCARRY_XLA=1 asks for it everywhere."""
    monkeypatch.delenv("SEQCARRY_XLA", raising=False)
    rng = np.random.default_rng(21)
    stack = random_stack(rng)
    kernel = StepKernel(stack, window_steps=8)
    small = works_of(rng, stack, [5, 30, 1, 12])  # the longest runs 4 windows of 8
    large = works_of(rng, stack, [8 * XLA_MIN_WINDOWS, 3, 7])
    for works, xla, path in ((small, False, "plain"), (large, True, "xla")):
        assert uses_xla([work.steps for work in works], 8, 8) is xla
        programs = kernel.compiled_programs
        results = [run_batch(kernel, works) for _ in range(2)]
        assert {program[0] for program in kernel.compiled_programs - programs} == {path}
        for result in results:
            assert result.xla is xla
        states = [{s.sequence_id: s for s in result.states} for result in results]
        for work in works:
            want_outputs, want_states = expected(stack, work)
            runs = [np.concatenate([o.outputs for o in result.outputs
                                    if o.sequence_id == work.carried.sequence_id])
                    for result in results]
            np.testing.assert_array_equal(runs[0], runs[1])
            np.testing.assert_allclose(runs[0], want_outputs, atol=1e-5)
            for k, (h, c) in enumerate(want_states):
                got = states[0][work.carried.sequence_id].tensors
                np.testing.assert_allclose(got[2 * k], h, atol=1e-5)
                np.testing.assert_allclose(got[2 * k + 1], c, atol=1e-5)
    # Asked for everywhere: the small work too runs XLA-compiled.
    everywhere = StepKernel(stack, window_steps=8, xla=True)
    assert run_batch(everywhere, small).xla
    assert {program[0] for program in everywhere.compiled_programs} == {"xla"}
