"""The job's last step: check the run's accounts, commit, write the run report, prune.

It runs inside the job, on one worker, once the manifest is written, so a run commits
itself even when the process that submitted it has gone (Dataflow Flex Templates,
Flink in detached mode). It is idempotent: retried after its swap, it finds its own
attempt in ``CURRENT`` and finishes the report.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import apache_beam as beam

import storage
from schemas.contract import InputError
from schemas.manifest import outputs_dir
from schemas.validation import UNREADABLE_FILE
from transforms.sequencing import DEFERRED, PROCESSED, REJECTED, SKIPPED

_LOG = logging.getLogger("seqcarry")
# Where every chunk read ends up: exactly one of these.
CATEGORIES = (PROCESSED, DEFERRED, SKIPPED, REJECTED)


@dataclasses.dataclass(frozen=True)
class CommitTarget:
    """What the commit step needs, fixed when the pipeline is built."""
    state_url: str
    outputs_url: str | None  # None: the run wrote no output files of its own
    run_id: str
    attempt: str
    parent: storage.CommitRecord | None  # CURRENT as read at planning: swapped from it
    planned_at: float  # time.time() when planning began, for the report's seconds
    keep: int | None = None
    orphan_grace_seconds: float = storage.DEFAULT_ORPHAN_GRACE_SECONDS
    max_rejected_fraction: float | None = None  # None: commit however much was rejected


def check_accounts(manifest: storage.Manifest) -> None:
    """Every chunk read must be in exactly one of :data:`CATEGORIES`."""
    counts = manifest.counts
    accounted = sum(counts.get(category, 0) for category in CATEGORIES)
    if counts.get("chunks_read", 0) != accounted:
        raise storage.StorageError(
            f"run {manifest.run_id} read {counts.get('chunks_read', 0)} chunks but "
            f"accounted for {accounted} ("
            f"{', '.join(f'{c} {counts.get(c, 0)}' for c in CATEGORIES)}); nothing was "
            "committed")


def rejected_fraction(counts: dict) -> float:
    """The share of the input rejected: rejected chunks and the rows of files rejected
    whole (a file that cannot be read at all weighs one row), over the same plus the
    chunks read. 0 for a run with no input."""
    unreadable = counts.get(f"files_rejected_{UNREADABLE_FILE}", 0)
    rejected = (counts.get(REJECTED, 0) + counts.get("chunks_in_rejected_files", 0)
                + unreadable)
    total = counts.get("chunks_read", 0) + counts.get("chunks_in_rejected_files", 0) + unreadable
    return rejected / total if total else 0.0


def check_rejections(manifest: storage.Manifest, target: CommitTarget) -> None:
    """Refuse to commit a run that rejected more of its input than allowed (an
    InputError: the input is the user's to fix; its dead letters are kept)."""
    fraction = rejected_fraction(manifest.counts)
    limit = target.max_rejected_fraction
    if limit is None or fraction <= limit:
        return
    report = make_report(manifest, target, 0.0)
    where = (report["dead_letters"][0].rsplit("/", 1)[0] if report["dead_letters"]
             else "the dead_letters PCollection")
    reasons = {**report["chunks_rejected_by_reason"],
               **{f"file {reason}": count
                  for reason, count in report["files_rejected_by_reason"].items()}}
    raise InputError(
        f"run {manifest.run_id} rejected {fraction:.1%} of its input, above "
        f"--max-rejected-fraction {limit:g}: {report['chunks_rejected']} of "
        f"{report['chunks_read']} chunks read, and {report['files_rejected']} files "
        f"rejected whole holding {report['chunks_in_rejected_files']} rows ("
        f"{', '.join(f'{count} {reason}' for reason, count in reasons.items())}); nothing "
        f"was committed; dead letters are in {where}")


def make_report(manifest: storage.Manifest, target: CommitTarget, seconds: float) -> dict:
    """The run report: counts from the manifest, plus wall time and throughput."""
    counts = manifest.counts

    def by_prefix(prefix: str) -> dict[str, int]:
        return {key.removeprefix(prefix): value for key, value in sorted(counts.items())
                if key.startswith(prefix)}

    steps = counts.get("steps_processed", 0)
    return {
        "run_id": manifest.run_id,
        "attempt": manifest.attempt,
        "parent": manifest.parent,
        "chunks_read": counts.get("chunks_read", 0),
        **{category: counts.get(category, 0) for category in CATEGORIES},
        "chunks_rejected_by_reason": by_prefix(f"{REJECTED}_"),
        "files_rejected": counts.get("files_rejected", 0),
        "files_rejected_by_reason": by_prefix("files_rejected_"),
        "chunks_in_rejected_files": counts.get("chunks_in_rejected_files", 0),
        "chunks_pending_total": manifest.pending_chunks,
        "pending_applied": counts.get("pending_applied", 0),
        "pending_rejected": counts.get("pending_rejected", 0),
        "sequences_touched": counts.get("sequences_touched", 0),
        "sequences_live": counts.get("sequences_live", 0),
        "sequences_ended": by_prefix("sequences_ended_"),
        "steps_processed": steps,
        # Which outputs the run wrote: every step's, or each chunk's last (--outputs-at).
        "outputs_at": manifest.outputs_at,
        # Batches by compiled path: "xla", or "plain" (a small bucket, SEQCARRY_XLA=0,
        # or a model XLA refuses; see transforms.sequencing.uses_xla).
        "batches_by_path": by_prefix("batches_"),
        "seconds": round(seconds, 3),
        "steps_per_second": round(steps / seconds, 1) if seconds > 0 else 0.0,
        # Time in each stage, summed over workers; the rest of the wall time is
        # Beam's: start-up, and moving records between stages (the join).
        "stage_seconds": {stage: round(ms / 1000, 3)
                          for stage, ms in by_prefix("ms_").items()},
        "outputs": (storage.join(target.outputs_url, outputs_dir(manifest.run_id,
                                                                  manifest.attempt))
                    if target.outputs_url is not None else None),
        "dead_letters": [r.path for r in manifest.dead_letter_files],
        "final_states": [r.path for r in manifest.final_state_files],
        "snapshot": storage.StateStore(target.state_url).snapshot_url(manifest.run_id,
                                                                      manifest.attempt),
    }


def commit_run(manifest: storage.Manifest, target: CommitTarget) -> dict:
    """Check, commit (idempotent), write the report and prune; returns the report."""
    check_accounts(manifest)
    check_rejections(manifest, target)
    store = storage.StateStore(target.state_url)
    storage.fault_point("before_commit")
    started = time.perf_counter()
    store.commit(target.run_id, target.attempt, target.parent)
    storage.fault_point("after_commit")
    report = make_report(manifest, target, time.time() - target.planned_at)
    report["stage_seconds"]["commit"] = round(time.perf_counter() - started, 3)
    store.write_report(target.run_id, target.attempt, report)
    store.remove_staging(target.run_id, target.attempt)  # every chunk was read by now
    if target.outputs_url is not None:
        _remove_failed_tries(target)
    _LOG.info("event=committed run_id=%s attempt=%s chunks_processed=%d steps=%d",
              target.run_id, target.attempt, report["chunks_processed"],
              report["steps_processed"])
    if target.keep:
        report["snapshots_removed"] = store.prune(target.keep, target.outputs_url,
                                                  target.orphan_grace_seconds)
        store.write_report(target.run_id, target.attempt, report)
    return report


def _remove_failed_tries(target: CommitTarget) -> None:
    """Remove the output folders of the run id's uncommitted attempts, so the run's
    outputs folder reads whole; a failure only delays that to ``seqcarry gc``."""
    try:
        storage.remove_other_attempts(target.outputs_url, target.run_id, target.attempt)
    except storage.StorageError as error:
        _LOG.warning("event=cleanup_failed run_id=%s: %s; `seqcarry gc --outputs` removes "
                     "them later", target.run_id, error)


class CommitRun(beam.DoFn):
    """The run's manifest -> its report, after committing it (see :func:`commit_run`)."""

    def __init__(self, target: CommitTarget):
        self._target = target

    def process(self, manifest: storage.Manifest):
        yield commit_run(manifest, self._target)
