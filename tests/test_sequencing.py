"""Per-sequence planning (order, deferral, duplicates, closing, expiry) and
deterministic batching."""
import dataclasses
import os
import subprocess
import sys

import numpy as np

from schemas import CarriedState, Chunk
from transforms.sequencing import (CONFLICTING_DUPLICATE, DEFERRED, DIGEST_WINDOW,
                                   DUPLICATE_UNVERIFIABLE, END_EXPIRED, PROCESSED, REJECTED,
                                   SEQUENCE_CLOSED, SKIPPED, Planner,
                                   stable_bucket, tombstone)

ZERO = (np.zeros(2, np.float32), np.zeros(2, np.float32))
PLANNER = Planner(run_id="now", run_number=5, started_at=1_000_000, zero_state=ZERO,
                  model_fingerprint="fp")


def chunk(index, steps=1, value=0.0, sequence_id="s", is_last=False, run="now"):
    return Chunk(sequence_id, index, np.full((steps, 3), value, np.float32), is_last, run)


def applied(*chunks, **fields):
    """The carried state after applying ``chunks`` (0..n-1), digests remembered."""
    return CarriedState("s", len(chunks), 7, ZERO, "fp",
                        b"".join(c.digest for c in chunks), **fields)


def indexes(chunks):
    return [c.chunk_index for c in chunks]


def test_new_sequence_applies_shuffled_chunks_in_order_from_zero():
    plan = PLANNER.plan("s", None, [], [chunk(2), chunk(0), chunk(1)])
    assert indexes(plan.work.chunks) == [0, 1, 2]
    assert plan.counts == {PROCESSED: 3} and not plan.pending and not plan.rejected
    assert plan.work.carried.last_run_number == 5


def test_a_gap_defers_the_chunk_and_everything_after_it_until_it_is_filled():
    first = PLANNER.plan("s", applied(chunk(0), chunk(1), chunk(2)), [],
                         [chunk(5), chunk(3), chunk(6)])
    assert indexes(first.work.chunks) == [3]
    assert indexes(first.pending) == [5, 6] and first.counts == {PROCESSED: 1, DEFERRED: 2}
    later = dataclasses.replace(PLANNER, run_id="later", run_number=6)
    carried = applied(*(chunk(i) for i in range(4)))
    filled = later.plan("s", carried, first.pending, [chunk(4, run="later")])
    assert indexes(filled.work.chunks) == [4, 5, 6] and not filled.pending
    assert filled.counts == {PROCESSED: 1, "pending_applied": 2}


def test_exact_duplicates_are_skipped_and_conflicting_ones_rejected():
    carried = applied(chunk(0, value=1), chunk(1, value=1))
    plan = PLANNER.plan("s", carried, [chunk(4, value=1)], [
        chunk(1, value=1), chunk(1, value=2),   # already applied: same, different
        chunk(4, value=1), chunk(4, value=9),   # pending: same, different
        chunk(2, value=1), chunk(2, value=1),   # twice in this run, same content
        chunk(3, value=1), chunk(3, value=5)])  # twice in this run, different contents
    assert indexes(plan.work.chunks) == [2]
    assert plan.counts == {PROCESSED: 1, SKIPPED: 3, REJECTED: 4,
                           f"{REJECTED}_{CONFLICTING_DUPLICATE}": 4}
    assert sorted(indexes(c for c, _, _ in plan.rejected)) == [1, 3, 3, 4]
    assert indexes(plan.pending) == [4]


def test_a_duplicate_older_than_the_digest_window_cannot_be_verified():
    carried = CarriedState("s", DIGEST_WINDOW + 5, 9, ZERO, "fp", b"\0" * 8 * DIGEST_WINDOW)
    plan = PLANNER.plan("s", carried, [], [chunk(2)])
    assert plan.counts == {REJECTED: 1, f"{REJECTED}_{DUPLICATE_UNVERIFIABLE}": 1}
    assert plan.unchanged.next_chunk_index == DIGEST_WINDOW + 5


def test_is_last_closes_the_sequence_and_later_chunks_are_rejected():
    plan = PLANNER.plan("s", None, [], [chunk(0), chunk(1, is_last=True), chunk(2)])
    assert indexes(plan.work.chunks) == [0, 1]
    assert [(c.chunk_index, reason) for c, reason, _ in plan.rejected] == [(2, SEQUENCE_CLOSED)]
    closed = tombstone(applied(chunk(0), chunk(1, is_last=True)))
    after = PLANNER.plan("s", closed, [], [chunk(1, is_last=True), chunk(2)])
    assert after.work is None and after.unchanged is closed
    assert after.counts == {SKIPPED: 1, REJECTED: 1, f"{REJECTED}_{SEQUENCE_CLOSED}": 1}


def test_idle_sequences_expire_after_n_runs_and_their_pending_chunks_with_them():
    expiring = dataclasses.replace(PLANNER, expire_after_runs=3)
    recent = applied(chunk(0), last_run_number=3)
    assert expiring.plan("s", recent, [chunk(5, run="old")], []).ended is None
    idle = applied(chunk(0), last_run_number=2)
    plan = expiring.plan("s", idle, [chunk(5, run="old")], [])
    assert plan.ended == (idle, END_EXPIRED)
    assert plan.unchanged.closed and plan.unchanged.tensors[0].size == 0
    assert plan.counts == {"pending_rejected": 1} and not plan.pending
    by_time = dataclasses.replace(PLANNER, expire_after_seconds=100)
    assert by_time.plan("s", applied(chunk(0), last_touched_at=999_950), [], []).ended is None
    assert by_time.plan("s", applied(chunk(0), last_touched_at=999_900), [], []).ended


def test_reset_state_restarts_another_models_state_from_zeros_keeping_chunk_numbers():
    old = CarriedState("s", 3, 30, (np.ones(2, np.float32),) * 2, "old-model")
    plan = dataclasses.replace(PLANNER, reset_state=True).plan("s", old, [], [chunk(3)])
    assert plan.work.carried.model_fingerprint == "fp"
    assert plan.work.carried.next_chunk_index == 3
    assert all(not t.any() for t in plan.work.carried.tensors)


def test_a_new_sequence_whose_chunks_are_all_rejected_leaves_no_state_row():
    plan = PLANNER.plan("s", None, [], [chunk(0, value=1), chunk(0, value=2)])
    assert plan.work is None and plan.unchanged is None


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
