"""The ``seqcarry`` command line (also ``python -m pipeline``)."""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import traceback
from typing import Sequence

import storage
from pipeline import logs
from pipeline.options import (ArgumentParser, InputError, JobFailedError, RunConfig,
                              add_model_arguments, add_model_options,
                              add_orphan_grace_argument, add_run_arguments, model_options,
                              refuse_unknown)

EXIT_OK, EXIT_BAD_INPUT, EXIT_STORAGE, EXIT_STATE_CONFLICT, EXIT_JOB_FAILED = 0, 2, 3, 4, 5

RUN_EPILOG = """\
Every option also takes Beam's underscore spelling (--batch_size for --batch-size).
Any other --flag must be a Beam pipeline option (of the installed Beam, runner options
included) and goes to Beam; one that Beam does not know either is refused (exit 2).
Beam's options, summarized (Beam's docs have them all):
  --runner=R                 DirectRunner (default: runs locally), DaskRunner,
                             FlinkRunner, PortableRunner, PrismRunner, DataflowRunner
  --direct_running_mode=M --direct_num_workers=N
                             DirectRunner: in_memory, multi_threading or
                             multi_processing, with N workers
  --dask_client_address=HOST:PORT                DaskRunner's scheduler
  --flink_master=HOST:PORT --environment_type=T --environment_config=C
                             FlinkRunner; T is LOOPBACK, EXTERNAL, PROCESS or DOCKER
  --job_endpoint=HOST:PORT   PortableRunner's job service
  --project --region --temp_location --setup_file=./setup.py
                             DataflowRunner (see docs/runners.md)

example:
  seqcarry run --model model.keras --chunks 'incoming/*.parquet' \\
      --state state/ --outputs outputs/ --run-id 2026-11-25
  seqcarry run --model model.keras --chunks incoming/a.parquet incoming/b.parquet \\
      --state state/ --outputs outputs/ \\
      --runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2
"""

EXIT_CODES = f"""\
exit codes: {EXIT_OK} ok, {EXIT_BAD_INPUT} bad input (model, chunk files, options),
            {EXIT_STORAGE} storage error (unreachable or damaged files),
            {EXIT_STATE_CONFLICT} state conflict (state moved, run id taken),
            {EXIT_JOB_FAILED} the runner's job failed (a lost worker, an engine error) and
              committed nothing: rerun it once the engine is healthy,
            1 unexpected error (a bug: please report it with the --debug output)
"""


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="seqcarry",
        description="Run LSTM models over chunked sequences with Apache Beam, carrying each "
                    "sequence's recurrent state across bundles, workers and runs.",
        epilog=EXIT_CODES)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback when a command fails")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true",
                        help="on stderr, only errors and the run's summary line")
    output.add_argument("--verbose", action="store_true",
                        help="on stderr, everything TensorFlow and Beam log (workers too)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, example: str,
                state: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description,
                                  epilog=f"example:\n  {example}\n\n{EXIT_CODES}")
        sub.set_defaults(command_parser=sub)
        if state:
            sub.add_argument("--state", required=True, help="state directory or URL")
        return sub

    run = commands.add_parser(
        "run", help="apply new chunks to the carried state and commit a new snapshot",
        description="Read new chunks, continue each sequence from its carried state, write "
                    "per-step outputs and commit a new state snapshot.",
        epilog=RUN_EPILOG + "\n" + EXIT_CODES)
    run.set_defaults(command_parser=run)
    add_run_arguments(run)

    command("snapshots", "list the snapshots one can roll back to, newest first",
            "List every committed snapshot still in a state directory (each one can be "
            "rolled back to), newest commit first: the current one (marked with *), its "
            "ancestors, and those rolled back from.",
            "seqcarry snapshots --state gs://my-bucket/seqcarry/state")

    verify = command(
        "verify", "check a snapshot's files against its manifest, running nothing",
        "Check every file of a snapshot (default: the committed one) against its manifest: "
        f"present, same sha256 and row count, readable. Exit code {EXIT_STORAGE} names the "
        "first damaged file.", "seqcarry verify --state state/")
    verify.add_argument("--run-id", dest="run_id", default=None,
                        help="snapshot to check (default: the committed one)")

    rollback = command(
        "rollback", "make an earlier committed snapshot the current one",
        "Point CURRENT back at an earlier committed snapshot (after verifying it). Later "
        "runs continue from there; the snapshots rolled back stay on disk until --keep "
        "removes them. This is also how a missing or damaged CURRENT is repaired.",
        "seqcarry rollback --state state/ --to 2026-11-24")
    rollback.add_argument("--to", required=True, dest="to", metavar="RUN_ID",
                          help="run id of the snapshot to go back to")

    gc = command(
        "gc", "remove old snapshots and the files of attempts that never committed",
        "Retention without a run: keep the snapshots of the N most recent commits "
        "(--keep), remove the others' files once no kept snapshot shares them, and the "
        "files of attempts that never committed once older than the grace period "
        "(snapshot, staging and, with --outputs, output folders). Safe to repeat; a gc "
        "that was killed is finished by the next one.",
        "seqcarry gc --state state/ --outputs outputs/ --keep 7")
    gc.add_argument("--keep", type=int, required=True, metavar="N",
                    help="snapshots to keep (N >= 1; the current one is always kept)")
    gc.add_argument("--outputs", default=None,
                    help="the runs' --outputs, to remove outputs of uncommitted attempts")
    add_orphan_grace_argument(gc)

    inspect = command(
        "inspect", "show one sequence: its carried state, pending chunks, runs",
        "Show what the committed history holds about one sequence: status, next chunk "
        "index, steps seen, the norm of each state part, its pending chunks, and the runs "
        "that applied its chunks (this reads the outputs of every committed run).",
        "seqcarry inspect --state build/demo/state --sequence seq-00007")
    inspect.add_argument("--sequence", required=True, help="the sequence_id to show")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")

    outputs = command(
        "outputs", "the committed per-step outputs of sequences across runs, in order",
        "Read the per-step outputs every committed run wrote (through the manifests, so "
        "only committed files, checksums checked, whatever layout they were written in), "
        "one row per step in step order (per chunk, at its last step, for runs with "
        "--outputs-at last): sequence_id, step (its place in the whole sequence), "
        "chunk_index, run_id, output_0 ... Without --to, CSV on stdout.",
        "seqcarry outputs --state build/demo/state --sequence seq-00007\n"
        "  seqcarry outputs --state gs://b/state --run-id 2026-11-25 --to day.parquet")
    outputs.add_argument("--sequence", nargs="+", default=None, metavar="ID",
                         help="only these sequence_ids (default: all)")
    outputs.add_argument("--run-id", dest="run_id", default=None,
                         help="only what this committed run computed (default: every run "
                              "of the committed history that retention keeps)")
    outputs.add_argument("--to", default=None, metavar="FILE",
                         help="write to FILE (local or gs://), Parquet if it ends in "
                              ".parquet, CSV if in .csv")

    report = command(
        "report", "the run history as a table, and as an HTML page with plots",
        "The committed runs as a table: chunks by category, pending chunks, live sequences, "
        "throughput. With --html, also one self-contained HTML file with plots (chunks by "
        "category per run, steps/s per run, live sequences and pending chunks over time, "
        "dead letters by reason).",
        "seqcarry report --state build/demo/state --html runs.html")
    report.add_argument("--html", default=None, metavar="FILE",
                        help="also write the report with plots to FILE")

    inspect_model = command(
        "inspect-model", "show a model as seqcarry runs it: format, layers, state, fingerprint",
        "Load a model the way `run` would (format detected: .keras file, SavedModel "
        "directory, tf.train.Checkpoint or TF1 checkpoint prefix; local or gs://) and show "
        "its format, layers with their units, input and output widths, the state carried "
        "per sequence (parts and sizes) and the fingerprint recorded with that state. "
        "Checkpoint variables the model does not use are listed as a note.",
        "seqcarry inspect-model checkpoints/model.ckpt --tf1-scope encoder/rnn=rnn\n"
        "  seqcarry inspect-model build/demo/model.keras --json", state=False)
    inspect_model.add_argument("path", metavar="PATH", help="the model (as for run --model)")
    add_model_options(inspect_model)
    inspect_model.add_argument("--json", action="store_true", help="print JSON instead of text")

    selfcheck = command(
        "selfcheck", "check that seqcarry computes exactly what your model computes",
        "Run the model through seqcarry's kernel on random sequences (token ids for an "
        "Embedding model), or on a sample of your chunk files (--chunks), cut into random "
        "chunks (one-step chunks included) and applied in random batches with the state "
        "carried between calls, on both compiled paths (XLA and plain), and compare the "
        "per-step outputs and final states with the model's own framework on each whole "
        "sequence: Keras for a .keras file or a tf.train.Checkpoint, the SavedModel's "
        "own step signature for a SavedModel (TF1 checkpoints are not supported: exit 2). "
        "Prints a JSON summary, then the largest difference and ok, or fails with exit "
        "code 1: here 1 means seqcarry does not compute what the model does (a bug: "
        "please report it with the summary).",
        "seqcarry selfcheck --model model.keras --sequences 32 --max-steps 500\n"
        "  seqcarry selfcheck --model ckpt/model --model-architecture arch.json "
        "--chunks 'incoming/*.parquet'", state=False)
    add_model_arguments(selfcheck)
    selfcheck.add_argument("--chunks", nargs="+", default=[], metavar="PATH",
                           help="take the sequences from these chunk files (files, folders "
                                "or globs) instead of random ones")
    selfcheck.add_argument("--sequences", type=int, default=16, metavar="N",
                           help="sequences to check (default 16)")
    selfcheck.add_argument("--max-steps", dest="max_steps", type=int, default=200,
                           metavar="N", help="steps per sequence: random ones have 1 to N, "
                                             "those of --chunks are cut at N (default 200)")
    selfcheck.add_argument("--tolerance", type=float, default=1e-5, metavar="T",
                           help="largest absolute difference accepted (default 1e-5)")
    selfcheck.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    selfcheck.add_argument("--window-steps", dest="window_steps", type=int, default=256,
                           metavar="N", help="as run's --window-steps (default 256)")

    import_state = command(
        "import-state", "start a state directory from states saved elsewhere (.npz)",
        "Commit recurrent states saved outside seqcarry (e.g. h and c kept with numpy "
        "between TF1 sessions) as the first snapshot of a new state directory, under the "
        "model's fingerprint; the next `run` with that model continues each sequence from "
        "them. FROM is a numpy .npz file with sequence_id [N] and one [N, size] array per "
        "state part, named as `inspect-model` lists them (layer0_h, layer0_c, ...), and "
        "optionally next_chunk_index [N] and steps_seen [N] (default 0).",
        "seqcarry import-state --model checkpoints/model.ckpt --from states.npz "
        "--state state/")
    add_model_arguments(import_state)
    import_state.add_argument("--from", required=True, dest="source", metavar="FROM",
                              help="the .npz file of states (local or URL)")
    import_state.add_argument("--run-id", dest="run_id", default=None,
                              help="name of the snapshot (default: import-<UTC time>)")

    pack = command(
        "pack", "turn long-format data (one row per step) into chunk files",
        "Read long-format data, one row per step (Parquet or CSV files: a sequence id "
        "column, an order column such as a time or step number, feature columns), sort "
        "each sequence's steps by the order column, cut them into chunks of --chunk-steps "
        "steps (the last one shorter) and write chunk Parquet files of the data contract "
        "into --output (new files pack-<UTC time>-<n>.parquet; nothing there is "
        "overwritten). Chunks are numbered from 0, or with --state from where the "
        "committed snapshot left each sequence, so new steps append to the runs already "
        "applied (pass all new steps of a sequence in one pack, and pack after the "
        "previous run committed). A sequence that ended in the state is refused. Prints "
        "a JSON summary.",
        "seqcarry pack --input 'raw/*.csv' --output incoming/2026-11-25 \\\n"
        "      --chunk-steps 64 --features f0,f1 --state state/", state=False)
    pack.add_argument("--input", required=True, nargs="+", dest="inputs", metavar="PATH",
                      help="long-format Parquet or CSV files (.csv, .csv.gz: CSV with a "
                           "header; anything else: Parquet), folders or globs, local or "
                           "gs://")
    pack.add_argument("--output", required=True, metavar="DIR",
                      help="folder for the chunk files (local or gs://)")
    pack.add_argument("--chunk-steps", dest="chunk_steps", type=int, required=True,
                      metavar="N", help="steps per chunk (the last chunk of a sequence "
                                        "may be shorter)")
    pack.add_argument("--sequence-column", dest="sequence_column", default="sequence_id",
                      metavar="C", help="the sequence id column (default sequence_id)")
    pack.add_argument("--order-column", dest="order_column", default="t", metavar="C",
                      help="the column that orders a sequence's steps (default t)")
    pack.add_argument("--features", dest="feature_columns", default=None,
                      metavar="C1,C2,...",
                      type=lambda text: [name.strip() for name in text.split(",")
                                         if name.strip()],
                      help="the feature columns, in the model's input order (default: "
                           "every other numeric column, in file order)")
    pack.add_argument("--last-column", dest="last_column", default=None, metavar="C",
                      help="a bool column true on a sequence's last step: its last chunk "
                           "gets is_last, ending the sequence")
    pack.add_argument("--state", default=None,
                      help="continue each sequence's chunk numbering from this state's "
                           "committed snapshot (default: start at chunk 0)")
    pack.add_argument("--rows-per-file", dest="rows_per_file", type=int, default=10_000,
                      metavar="N", help="chunks per output file (default 10000)")

    demo = command(
        "demo", "generate a model and data, run three times, check against Keras",
        "The built-in demo (what `make run` runs): a generated 2-layer LSTM model and a few "
        "hundred sequences spread over three runs on the DirectRunner, with some messy "
        "input, checked against Keras on each whole sequence. Any other --flag is passed "
        "to Beam.",
        "seqcarry demo --workdir /tmp/seqcarry-demo --direct_running_mode=multi_processing "
        "--direct_num_workers=2", state=False)
    demo.add_argument("--workdir", default="build/demo",
                      help="where the demo writes everything (emptied first; default "
                           "build/demo)")
    demo.add_argument("--sequences", type=int, default=300, help="how many sequences")
    return parser


def _details_text(details: dict) -> str:
    lines = [f"{key}: {value}" for key, value in details.items()
             if key not in ("state_norms", "pending_chunks", "runs")]
    for name, norm in details.get("state_norms", {}).items():
        lines.append(f"  |{name}| = {norm}")
    lines.append(f"pending chunks: {len(details['pending_chunks'])}")
    lines += [f"  chunk {c['chunk_index']} ({c['steps']} steps), waiting since run "
              f"{c['arrived_in_run']}" for c in details["pending_chunks"]]
    lines.append(f"runs that applied its chunks: {len(details['runs'])}")
    lines += [f"  {run['run_id']}: chunks {run['chunks']} ({run['steps']} steps)"
              + (f", ended ({run['ended']})" if "ended" in run else "")
              for run in details["runs"]]
    return "\n".join(lines)


def _model_text(summary: dict) -> str:
    """``inspect-model``'s summary as lines people read."""
    shown_apart = ("position", "kind", "input_dim", "output_dim")
    lines = [f"format: {summary['format']} ({summary['source']})",
             f"input width: {summary['input_width']}",
             f"output width: {summary['output_width']}", "layers:"]
    for layer in summary["layers"]:
        details = ", ".join(f"{key} {', '.join(value) if key == 'reads' else value}"
                            for key, value in layer.items() if key not in shown_apart)
        lines.append(f"  {layer['position']:<5} {layer['kind']:<13} "
                     f"{layer['input_dim']} -> {layer['output_dim']}: {details}")
    states = summary["state_parts"]
    lines.append(f"state per sequence: {summary['state_floats_per_sequence']} float32 "
                 f"({4 * summary['state_floats_per_sequence']} bytes): "
                 + ", ".join(f"{name} {size}" for name, size in states.items()))
    if not summary["sequence_output"]:
        lines.append("outputs: one per sequence (a classifier); computed at every step, "
                     "as if the sequence ended there")
    lines.append(f"fingerprint: {summary['fingerprint']}")
    lines += [f"note: {note}" for note in summary["notes"]]
    return "\n".join(lines)


def _snapshots_table(store: storage.StateStore) -> str:
    snapshots = store.snapshots()
    if not snapshots:
        raise InputError(f"{store.url} has no committed snapshot")
    rows = [("", "run_id", "attempt", "created_at", "sequences", "parent",
             "chunks_processed", "status")]
    rows += [("*" if status == "current" else "", m.run_id, m.attempt or "-", m.created_at,
              str(m.sequences), m.parent or "-", str(m.counts.get("chunks_processed", 0)),
              status) for m, status in snapshots]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


def classify_error(error: BaseException | None) -> tuple[int, BaseException] | None:
    """The exit code and the seqcarry error found in ``error``'s cause chain.

    Runners wrap what a DoFn raised; None means no seqcarry error is behind it (a bug).
    """
    from schemas import ContractError
    from transforms.models import ModelError

    codes = ((JobFailedError, EXIT_JOB_FAILED),
             (storage.StateConflictError, EXIT_STATE_CONFLICT),
             (storage.StorageError, EXIT_STORAGE),
             ((InputError, ContractError, ModelError, storage.UnsupportedLocation),
              EXIT_BAD_INPUT))
    while error is not None:
        for kinds, code in codes:
            if isinstance(error, kinds):
                return code, error
        error = error.__cause__ or error.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments, beam_args = _parser().parse_known_args(argv)
    logs.configure(logs.mode_of(arguments.quiet, arguments.verbose))  # before TF or Beam
    try:  # only `run` and `demo` pass arguments on to Beam; nothing is dropped
        refuse_unknown(beam_args, arguments.command_parser,
                       beam=arguments.command in ("run", "demo"))
    except InputError as error:
        print(f"seqcarry: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if arguments.command == "run":
            from pipeline.build import run_job, summary_line

            options = {k: v for k, v in vars(arguments).items()
                       if k not in ("command", "command_parser", "debug", "quiet", "verbose")}
            report = run_job(RunConfig(**options), beam_args)
            print(json.dumps(report, indent=2))
            print(summary_line(report), file=sys.stderr)
        elif arguments.command == "snapshots":
            print(_snapshots_table(storage.StateStore(arguments.state)))
        elif arguments.command == "verify":
            manifest = storage.StateStore(arguments.state).verify(arguments.run_id)
            print(f"ok: snapshot {manifest.run_id}: {len(manifest.state_files)} files, "
                  f"{manifest.sequences} sequences, checksums and row counts match")
        elif arguments.command == "rollback":
            store = storage.StateStore(arguments.state)
            try:
                before = getattr(store.current(), "run_id", "empty")
            except storage.IntegrityError:
                before = "a missing or damaged CURRENT"
            store.rollback(arguments.to)
            print(f"CURRENT moved from {before} to {arguments.to}")
        elif arguments.command == "gc":
            storage.check_retention(arguments.keep, arguments.orphan_grace_hours)
            retired = storage.StateStore(arguments.state).prune(
                arguments.keep, arguments.outputs, arguments.orphan_grace_hours * 3600)
            print(f"retired {len(retired)} snapshot(s): {', '.join(retired) or '-'}")
        elif arguments.command == "inspect":
            from pipeline.results import sequence_details

            try:
                details = sequence_details(arguments.state, arguments.sequence)
            except KeyError as missing:
                raise InputError(missing.args[0]) from missing
            print(json.dumps(details, indent=2) if arguments.json
                  else _details_text(details))
        elif arguments.command == "outputs":
            from pipeline.results import read_outputs, write_table_as

            table = read_outputs(arguments.state, arguments.sequence, arguments.run_id)
            if arguments.to:
                write_table_as(table, arguments.to)
                print(f"wrote {len(table)} steps of "
                      f"{len(table['sequence_id'].unique())} sequences to {arguments.to}",
                      file=sys.stderr)
            else:
                write_table_as(table, sys.stdout.buffer)
        elif arguments.command == "report":
            from pipeline import report

            rows = report.history_rows(arguments.state)
            if not rows:
                raise InputError(f"{arguments.state} has no committed run to report on")
            print(report.text_table(rows))
            if arguments.html:
                storage.write_bytes(arguments.html,
                                    report.html_page(arguments.state, rows).encode())
                print(f"wrote {arguments.html}")
        elif arguments.command == "inspect-model":
            from transforms.models import load_model

            summary = load_model(arguments.path, model_options(arguments)).summary()
            print(json.dumps(summary, indent=2) if arguments.json else _model_text(summary))
        elif arguments.command == "selfcheck":
            from pipeline.selfcheck import result_line, selfcheck

            summary = selfcheck(arguments.model, model_options(arguments),
                                sequences=arguments.sequences, max_steps=arguments.max_steps,
                                seed=arguments.seed, tolerance=arguments.tolerance,
                                chunks=arguments.chunks, window_steps=arguments.window_steps)
            print(json.dumps(summary, indent=2))
            print(result_line(summary), file=sys.stderr)
            if not summary["ok"]:
                return 1
        elif arguments.command == "import-state":
            from pipeline.importer import import_state

            print(json.dumps(import_state(arguments.model, model_options(arguments),
                                          arguments.state, arguments.source,
                                          arguments.run_id), indent=2))
        elif arguments.command == "pack":
            from pipeline.pack import pack_files

            summary = pack_files(arguments.inputs, arguments.output,
                                 chunk_steps=arguments.chunk_steps,
                                 sequence_column=arguments.sequence_column,
                                 order_column=arguments.order_column,
                                 feature_columns=arguments.feature_columns,
                                 last_column=arguments.last_column, state=arguments.state,
                                 rows_per_file=arguments.rows_per_file)
            print(json.dumps(summary, indent=2))
            print(f"seqcarry: ok: packed {summary['steps']} steps of "
                  f"{summary['sequences']} sequences into {summary['chunks']} chunks, "
                  f"{len(summary['files'])} file(s) in {arguments.output}", file=sys.stderr)
        elif arguments.command == "demo":
            from pipeline.demo import run_demo

            worst = run_demo(arguments.workdir, arguments.sequences, beam_args=beam_args)
            if worst > 1e-4:
                print(f"seqcarry: error: the demo differs from Keras by {worst:.3g}",
                      file=sys.stderr)
                return 1
        return EXIT_OK
    except Exception as error:  # one clear line for people; --debug for the traceback
        known = classify_error(error)
        if arguments.debug or known is None:
            traceback.print_exc()
        print(f"seqcarry: error: {known[1] if known else error}", file=sys.stderr)
        return known[0] if known else 1


def exit_now(code: int) -> None:
    """Exit with ``code`` without the interpreter's teardown, where C++ threads still
    running (TensorFlow's, gRPC's for Beam, Arrow's) could race it and abort the process
    after it printed its result. The one such abort found (exit 134, Arrow dropping a
    Python buffer at shutdown) is fixed where it happened (``storage.read_buffer``);
    this stays as a backstop. The exit handlers still run first: Beam's stop the servers
    it started (a Prism runner, a Flink job server)."""
    # Stopping them is expected here: Beam's "Really destroying service" warning is not
    # for users, and the run's summary stays the last line.
    logging.getLogger("apache_beam.utils.subprocess_server").setLevel(logging.ERROR)
    atexit._run_exitfuncs()  # what a normal exit runs before the teardown
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry_point() -> None:
    """The ``seqcarry`` command: :func:`main`, then :func:`exit_now`."""
    logs.claim_stderr()  # its stderr may be filtered (pipeline/logs.py)
    exit_now(main())
