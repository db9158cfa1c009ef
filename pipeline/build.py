"""One seqcarry run: plan it, build the Beam pipeline, run it, commit, report.

``run(argv)`` is the entry point (as in Beam's wordcount): seqcarry's own options
are parsed here, and every other ``--flag`` goes to Beam's ``PipelineOptions``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

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
    parent: storage.Manifest | None
    stack: RecurrentStack
    chunk_files: tuple[str, ...]
    state_shards: int


def plan_run(config: RunConfig) -> RunPlan:
    """Check the inputs and decide everything the pipeline needs to be built."""
    if config.batch_size < 1 or config.window_steps < 1:
        raise InputError("--batch-size and --window-steps must be at least 1")
    stack = load_model(config.model)
    store = storage.StateStore(config.state)
    run_id = config.run_id or datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    if not _RUN_ID.match(run_id):
        raise InputError(f"--run-id {run_id!r} must be letters, digits, '.', '_' or '-' "
                         "(at most 128, starting with a letter or digit)")
    store.check_new_run(run_id)
    current = store.current()
    parent = store.manifest(current) if current else None
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
    return RunPlan(config, run_id, parent, stack, tuple(chunk_files), shards)


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
        | "StateFiles" >> beam.Create([r.path for r in plan.parent.state_files]
                                      if plan.parent else [])
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
    pipeline = beam.Pipeline(options=PipelineOptions(list(beam_args)))
    build(pipeline, plan)
    pipeline.run().wait_until_finish()

    store = storage.StateStore(config.state)
    manifest = store.manifest(plan.run_id)
    counts = manifest.counts
    accounted = counts.get("chunks_processed", 0) + counts.get("chunks_held_out", 0)
    if counts.get("chunks_read", 0) != accounted:
        raise storage.StorageError(
            f"run {plan.run_id} read {counts.get('chunks_read', 0)} chunks but accounted for "
            f"{accounted}; nothing was committed")
    store.commit(plan.run_id, plan.parent.run_id if plan.parent else None)
    report = make_report(manifest, config, time.perf_counter() - started)
    store.write_report(plan.run_id, report)
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
