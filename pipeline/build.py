"""One seqcarry run: plan it, build the Beam pipeline, run it, commit, report.

``run(argv)`` is the entry point (as in Beam's wordcount): seqcarry's own options
are parsed here, and every other ``--flag`` goes to Beam's ``PipelineOptions``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import re
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline import storage
from pipeline.options import InputError, RunConfig, add_run_arguments
from transforms.dofns import (LEDGER, ApplyChunks, ReadChunkFile, ReadStateFile,
                              WriteManifest, WriteOutputPart, WriteStateShard)
from transforms.model import ModelError, RecurrentStack, load_model
from transforms.sequencing import stable_bucket

ROWS_PER_STATE_FILE = 100_000
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A run's inputs, fixed before the pipeline is built."""
    config: RunConfig
    run_id: str
    parent_pointer: storage.Pointer | None  # CURRENT as read: the commit swaps from it
    parent: storage.Manifest | None
    stack: RecurrentStack
    chunk_files: tuple[str, ...]
    state_shards: int


def plan_run(config: RunConfig) -> RunPlan:
    """Check the inputs and decide everything the pipeline needs to be built."""
    if config.batch_size < 1 or config.window_steps < 1:
        raise InputError("--batch-size and --window-steps must be at least 1")
    storage.check_location(config.state, "--state")
    storage.check_location(config.outputs, "--outputs")
    stack = load_model(config.model)
    store = storage.StateStore(config.state)
    run_id = config.run_id or datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    if not _RUN_ID.match(run_id):
        raise InputError(f"--run-id {run_id!r} must be letters, digits, '.', '_' or '-' "
                         "(at most 128, starting with a letter or digit)")
    pointer = store.current()
    parent = store.manifest(pointer.run_id, pointer.manifest_sha256) if pointer else None
    if parent and parent.model_fingerprint != stack.fingerprint:
        raise ModelError(
            f"the state in {config.state} was written by model {parent.model_fingerprint}, "
            f"but {config.model} is {stack.fingerprint}; use the model that wrote the state")
    chunk_files = storage.expand_glob(config.chunks)
    if not chunk_files:
        raise InputError(f"no Parquet files match --chunks {config.chunks}")
    input_rows = sum(storage.parquet_rows(url) for url in chunk_files)
    live = parent.sequences if parent else 0
    shards = max(1, -(-(live + input_rows) // ROWS_PER_STATE_FILE))
    store.prepare_run(run_id, config.outputs)
    return RunPlan(config, run_id, pointer, parent, stack, tuple(chunk_files), shards)


def build(pipeline: beam.Pipeline, plan: RunPlan) -> None:
    """Add one run's transforms to ``pipeline``; it ends by writing the run's manifest."""
    config, stack = plan.config, plan.stack
    chunks = (
        pipeline
        | "ChunkFiles" >> beam.Create(plan.chunk_files)
        | "SpreadChunkFiles" >> beam.Reshuffle()
        | "ReadChunks" >> beam.ParDo(ReadChunkFile(stack.input_dim)).with_outputs(
            LEDGER, main="chunks"))
    states = (
        pipeline
        | "StateFiles" >> beam.Create(plan.parent.state_files if plan.parent else [])
        | "SpreadStateFiles" >> beam.Reshuffle()
        | "ReadStates" >> beam.ParDo(ReadStateFile(stack.state_names)))
    applied = {"chunks": chunks.chunks, "states": states} | "ApplyChunks" >> ApplyChunks(
        config.model, stack.zero_state(), stack.fingerprint, config.batch_size,
        config.window_steps)
    output_files = applied["outputs"] | "WriteOutputs" >> beam.ParDo(
        WriteOutputPart(config.outputs, plan.run_id))
    shards = plan.state_shards
    state_files = (
        applied["states"]
        | "KeyByStateShard" >> beam.Map(lambda s: (stable_bucket(s.sequence_id, shards), s))
        | "GroupStateShards" >> beam.GroupByKey()
        | "WriteStates" >> beam.ParDo(WriteStateShard(
            config.state, plan.run_id, shards, stack.state_names)))
    _ = (
        (chunks[LEDGER], applied["ledger"], output_files, state_files)
        | "Ledger" >> beam.Flatten()
        | "OneKey" >> beam.Map(lambda entry: (None, entry))
        | "GatherLedger" >> beam.GroupByKey()
        | "WriteManifest" >> beam.ParDo(WriteManifest(
            config.state, plan.run_id, plan.parent.run_id if plan.parent else None,
            stack.fingerprint, stack.state_names)))


def run_job(config: RunConfig, beam_args: Sequence[str] = ()) -> dict:
    """Run once: read, compute, write, commit. Returns the run report."""
    started = time.perf_counter()
    plan = plan_run(config)
    manifest = execute(plan, beam_args)
    return commit(plan, manifest, time.perf_counter() - started)


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam's options from the command line.

    ``DirectRunner`` (also Beam's default) runs on Beam's ``FnApiRunner``: the local
    runner the DirectRunner ends up on anyway, without first trying to download the
    Prism runner from the internet (which fails offline, and elsewhere silently swaps
    the runner). ``--runner=PrismRunner`` still asks for Prism explicitly.
    """
    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner"):
        standard.runner = "FnApiRunner"
    return options


def execute(plan: RunPlan, beam_args: Sequence[str] = ()) -> storage.Manifest:
    """Run the pipeline; returns the manifest it wrote (not yet committed)."""
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    build(pipeline, plan)
    pipeline.run().wait_until_finish()
    return storage.StateStore(plan.config.state).manifest(plan.run_id)


def commit(plan: RunPlan, manifest: storage.Manifest, seconds: float) -> dict:
    """Check the run's accounts, move CURRENT to its snapshot, write its report."""
    store = storage.StateStore(plan.config.state)
    counts = manifest.counts
    accounted = counts.get("chunks_processed", 0) + counts.get("chunks_held_out", 0)
    if counts.get("chunks_read", 0) != accounted:
        raise storage.StorageError(
            f"run {plan.run_id} read {counts.get('chunks_read', 0)} chunks but accounted for "
            f"{accounted}; nothing was committed")
    manifest_sha256 = hashlib.sha256(
        storage.read_bytes(store.manifest_url(plan.run_id))).hexdigest()
    storage.fault_point("before_commit")
    store.commit(plan.run_id, manifest_sha256, plan.parent_pointer)
    storage.fault_point("after_commit")
    report = make_report(manifest, plan.config, seconds)
    store.write_report(plan.run_id, report)
    if plan.config.keep:
        report["snapshots_removed"] = store.prune(plan.config.keep)
    return report


def make_report(manifest: storage.Manifest, config: RunConfig, seconds: float) -> dict:
    """The run report: counts from the manifest, plus wall time and throughput."""
    counts = manifest.counts
    steps = counts.get("steps_processed", 0)
    return {
        "run_id": manifest.run_id,
        "parent": manifest.parent,
        "chunks_read": counts.get("chunks_read", 0),
        "chunks_processed": counts.get("chunks_processed", 0),
        "chunks_held_out": counts.get("chunks_held_out", 0),
        "chunks_held_out_by_reason": {key.removeprefix("chunks_held_out_"): value
                                      for key, value in sorted(counts.items())
                                      if key.startswith("chunks_held_out_")},
        "sequences_touched": counts.get("sequences_touched", 0),
        "sequences_live": manifest.sequences,
        "steps_processed": steps,
        "seconds": round(seconds, 3),
        "steps_per_second": round(steps / seconds, 1) if seconds > 0 else 0.0,
        "outputs": storage.join(config.outputs, manifest.run_id),
        "snapshot": storage.StateStore(config.state).snapshot_url(manifest.run_id),
    }


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``seqcarry run`` arguments (unknown ones go to Beam) and run once."""
    parser = argparse.ArgumentParser(prog="seqcarry run")
    add_run_arguments(parser)
    known, beam_args = parser.parse_known_args(argv)
    return run_job(RunConfig(**vars(known)), beam_args)
