"""Per-sequence planning (order, hold-outs) and deterministic batching."""
import os
import subprocess
import sys

import numpy as np

from schemas import CarriedState, Chunk
from transforms.sequencing import (HELD_OUT_ALREADY_APPLIED, HELD_OUT_GAP, HELD_OUT_REPEATED,
                                   SequenceWork, plan_sequence, split_into_batches,
                                   stable_bucket)

ZERO = (np.zeros(2, np.float32), np.zeros(2, np.float32))


def chunk(index, steps=1, value=0.0, sequence_id="s"):
    return Chunk(sequence_id, index, np.full((steps, 3), value, np.float32))


def carried(next_index):
    return CarriedState("s", next_index, 7, ZERO, "fp")


def test_new_sequence_applies_shuffled_chunks_in_order_from_zero():
    plan = plan_sequence("s", None, [chunk(2), chunk(0), chunk(1)], ZERO, "fp")
    assert [c.chunk_index for c in plan.work.chunks] == [0, 1, 2]
    assert plan.work.carried.next_chunk_index == 0 and not plan.held_out


def test_gap_holds_out_the_chunk_and_everything_after_it():
    plan = plan_sequence("s", carried(3), [chunk(5), chunk(3), chunk(6)], ZERO, "fp")
    assert [c.chunk_index for c in plan.work.chunks] == [3]
    assert [(c.chunk_index, r) for c, r in plan.held_out] == [(5, HELD_OUT_GAP),
                                                              (6, HELD_OUT_GAP)]


def test_already_applied_and_repeated_indexes_are_held_out():
    plan = plan_sequence("s", carried(2), [chunk(1), chunk(2, value=1), chunk(2, value=2)],
                         ZERO, "fp")
    assert [c.chunk_index for c in plan.work.chunks] == [2]
    assert sorted(r for _, r in plan.held_out) == sorted([HELD_OUT_ALREADY_APPLIED,
                                                          HELD_OUT_REPEATED])


def test_sequence_with_nothing_to_apply_keeps_its_state_unchanged():
    state = carried(4)
    plan = plan_sequence("s", state, [chunk(9)], ZERO, "fp")
    assert plan.work is None and plan.unchanged is state


def work(sequence_id, steps):
    return SequenceWork(CarriedState(sequence_id, 0, 0, ZERO, "fp"),
                        (chunk(0, steps, sequence_id=sequence_id),))


def test_batches_are_even_bounded_deterministic_and_grouped_by_length():
    works = [work(f"s{i}", steps) for i, steps in enumerate([5, 1, 9, 3, 7, 2, 8])]
    batches = split_into_batches(works, batch_size=3)
    assert [len(b) for b in batches] == [2, 3, 2]
    assert [[w.steps for w in b] for b in batches] == [[9, 8], [7, 5, 3], [2, 1]]
    again = split_into_batches(list(reversed(works)), batch_size=3)
    assert [[w.carried.sequence_id for w in b] for b in again] == \
        [[w.carried.sequence_id for w in b] for b in batches]
    assert split_into_batches([], 3) == []


def test_stable_bucket_is_the_same_in_another_process_with_another_hash_seed():
    ids = [f"seq-{i:05d}" for i in range(50)]
    here = [stable_bucket(i, 97) for i in ids]
    there = subprocess.run(
        [sys.executable, "-c", "import sys; from transforms.sequencing import stable_bucket; "
         f"print([stable_bucket(i, 97) for i in {ids!r}])"],
        env=os.environ | {"PYTHONHASHSEED": "12345"}, capture_output=True, text=True,
        check=True).stdout
    assert there.strip() == str(here)
    assert len(set(here)) > 20 and stable_bucket("anything", 1) == 0
