"""seqcarry as a Dataflow Flex Template: the template's metadata, generated from the
``seqcarry run`` options (:class:`~pipeline.options.SeqcarryOptions`), and the
launcher the template image runs (docs/flex-template.md).

Dataflow hands a template's parameters to the launcher as ``--name=value``, Beam's
underscore spelling, with its own options (``--project``, ``--region``,
``--temp_location``, ``--runner=DataflowRunner``...) mixed in; everything is a
string. seqcarry's boolean options (``store_true``) take no value on a command line,
so the launcher turns ``--reset_state=true`` into ``--reset_state`` and drops
``--reset_state=false`` before :func:`pipeline.build.run` parses the arguments.

The launcher always submits and exits (``--no_wait``): Dataflow starts a template's
job only once the launcher has exited, so it cannot wait for the job. The job commits
by itself and writes its report where the launcher's output says.

``python -m pipeline.template metadata [--out FILE]`` prints (or writes) the metadata
JSON for ``gcloud dataflow flex-template build --metadata-file``; any other arguments
launch a run. No TensorFlow import until a run is launched.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any, Sequence

from pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, classify_error, exit_now
from pipeline.options import ArgumentParser, InputError, add_run_arguments

# Set by the launcher whatever the parameters say, so not a template parameter.
NO_WAIT = "no_wait"
# Parameters that name files or folders: Dataflow's workers read only gs:// ones.
GCS_PATH_OPTIONS = ("model", "model_architecture", "chunks", "state", "outputs")
GCS_PATH = r"^gs://[^\n\r]+$"
INTEGER = r"^[0-9]+$"
NUMBER = r"^-?([0-9]+\.?[0-9]*|\.[0-9]+)$"
BOOLEAN = r"^(?i:true|false)$"


def _run_options() -> list[argparse.Action]:
    """The ``seqcarry run`` options as their parser holds them (required ones marked)."""
    parser = ArgumentParser(add_help=False)
    add_run_arguments(parser)
    return [action for action in parser._actions if action.option_strings]


def parameter_name(action: argparse.Action) -> str:
    """An option's template parameter name: its underscore spelling (``batch_size``),
    the flag Dataflow passes as ``--batch_size=...``."""
    return next(flag[2:] for flag in action.option_strings
                if flag == "--" + flag[2:].replace("-", "_"))


def is_boolean(action: argparse.Action) -> bool:
    """An option that takes no value on a command line (``store_true``)."""
    return action.nargs == 0 and action.const is True


def _parameter(action: argparse.Action) -> dict[str, Any]:
    name = parameter_name(action)
    help_text = action.help or ""
    regexes = []
    if is_boolean(action):
        help_text += " (true or false; default false)"
        regexes = [BOOLEAN]
    elif name in GCS_PATH_OPTIONS:
        regexes = [GCS_PATH]
    elif action.type is int:
        regexes = [INTEGER]
    elif action.type is float:
        regexes = [NUMBER]
    elif action.choices:
        regexes = [f"^({'|'.join(map(re.escape, action.choices))})$"]
    if action.nargs == "+" or isinstance(action, argparse._AppendAction):
        help_text += "; a template takes one value"
    words = name.split("_")
    parameter = {"name": name, "label": " ".join([words[0].capitalize(), *words[1:]]),
                 "helpText": help_text, "isOptional": not action.required}
    return parameter | ({"regexes": regexes} if regexes else {})


def template_metadata() -> dict[str, Any]:
    """The Flex Template metadata: one parameter per ``seqcarry run`` option (but
    ``no_wait``, which the launcher sets), named in Beam's underscore spelling."""
    return {
        "name": "seqcarry run",
        "description": (
            "Apply new chunks of long sequences to their carried LSTM/GRU state: read the "
            "chunk Parquet files, continue every sequence where the last run stopped, "
            "write per-step outputs and commit a new state snapshot. The launcher submits "
            "the job and exits; the job commits by itself and writes its report to "
            "<state>/snapshots/<run_id>/<attempt>/report.json."),
        "parameters": [_parameter(action) for action in _run_options()
                       if parameter_name(action) != NO_WAIT],
    }


def template_arguments(argv: Sequence[str]) -> list[str]:
    """Template-style arguments as ``seqcarry run`` takes them: each boolean option's
    ``--flag=true`` becomes ``--flag`` and ``--flag=false`` is dropped, and
    ``--no_wait`` is added. Anything else is passed as is (and checked by the run)."""
    booleans = {flag: parameter_name(action) for action in _run_options()
                if is_boolean(action) for flag in action.option_strings}
    translated = []
    for argument in argv:
        flag, equals, value = argument.partition("=")
        if flag not in booleans:
            translated.append(argument)
            continue
        if equals and value.lower() not in ("true", "false"):
            raise InputError(f"{flag}={value}: give true or false")
        if booleans[flag] == NO_WAIT and equals and value.lower() == "false":
            raise InputError(f"{argument}: a Flex Template launch cannot wait for its "
                             "job (Dataflow starts the job once the launcher exits)")
        if not equals or value.lower() == "true":
            translated.append(flag)
    no_wait = [flag for flag, name in booleans.items() if name == NO_WAIT]
    return translated + ([] if set(no_wait) & set(translated) else [f"--{NO_WAIT}"])


def main(argv: Sequence[str] | None = None) -> int:
    """Launch one run from template-style arguments: submit the job, print where its
    report will appear (JSON) and return the exit code (as ``seqcarry run``'s: 2 for
    bad input, 3 storage, 4 state conflict, 1 a bug)."""
    try:
        arguments = template_arguments(sys.argv[1:] if argv is None else argv)
    except InputError as error:
        print(f"seqcarry: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from pipeline.build import run  # TensorFlow: only once a run is launched

    try:
        submitted = run(arguments)
    except Exception as error:
        known = classify_error(error)
        if known is None:
            raise
        print(f"seqcarry: error: {known[1]}", file=sys.stderr)
        return known[0]
    print(json.dumps(submitted, indent=2))
    return EXIT_OK


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.template``: ``metadata [--out FILE]`` prints the metadata
    JSON (or writes it to FILE); other arguments go to :func:`main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["metadata"]:
        return main(argv)
    parser = argparse.ArgumentParser(prog="python -m pipeline.template metadata",
                                     description="The Flex Template metadata JSON.")
    parser.add_argument("--out", metavar="FILE", help="write it to FILE (default: print)")
    out = parser.parse_args(argv[1:]).out
    text = json.dumps(template_metadata(), indent=2) + "\n"
    if out:
        with open(out, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def launch() -> None:
    """The template image's entry point: :func:`cli` with progress lines on stderr,
    then :func:`~pipeline.cli.exit_now`, as ``seqcarry`` exits."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    exit_now(cli())


if __name__ == "__main__":
    launch()
