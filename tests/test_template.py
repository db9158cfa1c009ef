"""The Dataflow Flex Template: metadata generated from seqcarry's options, and the
launcher, up to the point of submitting (nothing here reaches Google: paths are on
fake-gcs-server, Pipeline.run is intercepted, other hosts are refused)."""
import argparse
import json
import os
import re
import socket
import subprocess
import sys

import fsspec
import pytest
from apache_beam.options.pipeline_options import (GoogleCloudOptions, StandardOptions,
                                                  WorkerOptions)
from apache_beam.runners.runner import PipelineResult, PipelineState

import apache_beam as beam
import storage
from pipeline import template
from pipeline.options import REQUIRED_RUN_OPTIONS, SeqcarryOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "europe-west1-docker.pkg.dev/my-project/seqcarry/seqcarry-launcher:0.1.0"


def dataflow_arguments(bucket):
    """What Dataflow's launcher adds to a template's parameters."""
    return ["--runner=DataflowRunner", "--project=my-project", "--region=europe-west1",
            f"--temp_location={bucket}/tmp", f"--staging_location={bucket}/staging",
            f"--sdk_container_image={IMAGE}"]


def seqcarry_options():
    """Every option SeqcarryOptions registers (as Beam's parser gets them), by its
    underscore spelling."""
    parser = argparse.ArgumentParser(add_help=False)
    SeqcarryOptions._add_argparse_args(parser)
    names = [[flag[2:] for flag in action.option_strings if "-" not in flag[2:]]
             for action in parser._actions]
    assert all(len(spelled) == 1 for spelled in names)
    return {spelled[0] for spelled in names}


def test_the_metadata_lists_every_option_but_the_launchers_own():
    metadata = template.template_metadata()
    parameters = {p["name"]: p for p in metadata["parameters"]}
    assert len(parameters) == len(metadata["parameters"])
    options = seqcarry_options()
    assert template.NO_WAIT in options  # set by the launcher, not a parameter
    assert set(parameters) == options - {template.NO_WAIT}
    assert metadata["name"] and metadata["description"]
    for parameter in parameters.values():
        assert parameter["label"] and parameter["helpText"], parameter
        for regex in parameter.get("regexes", []):
            re.compile(regex)
    assert {name for name, p in parameters.items() if not p["isOptional"]} == set(
        REQUIRED_RUN_OPTIONS)
    assert set(template.GCS_PATH_OPTIONS) <= set(parameters)


def test_the_metadata_regexes_take_what_the_launcher_takes():
    parameters = {p["name"]: p for p in template.template_metadata()["parameters"]}

    def matches(name, value):
        return all(re.match(regex, value) for regex in parameters[name].get("regexes", []))

    assert matches("model", "gs://bucket/models/model.keras")
    assert not matches("state", "/tmp/state") and not matches("outputs", "outputs/")
    assert matches("chunks", "gs://bucket/incoming/*.parquet")
    assert matches("batch_size", "8") and not matches("batch_size", "eight")
    assert matches("orphan_grace_hours", "0.5") and matches("tf1_forget_bias", "-1")
    assert all(matches(name, value) for name in ("reset_state", "allow_non_finite")
               for value in ("true", "false", "True", "FALSE"))
    assert not matches("reset_state", "yes")
    assert matches("outputs_at", "last") and not matches("outputs_at", "lastly")
    assert matches("xla", "on") and not matches("xla", "yes")


def test_a_new_option_appears_in_the_metadata_by_itself(monkeypatch):
    def with_one_more(parser, required=True):
        add_run_arguments(parser, required)
        parser.add_argument("--shiny-new-option", type=int, help="something new")

    add_run_arguments = template.add_run_arguments
    monkeypatch.setattr(template, "add_run_arguments", with_one_more)
    (new,) = [p for p in template.template_metadata()["parameters"]
              if p["name"] == "shiny_new_option"]
    assert new == {"name": "shiny_new_option", "label": "Shiny new option",
                   "helpText": "something new", "isOptional": True,
                   "regexes": [template.INTEGER]}


@pytest.mark.parametrize("given, expected", [
    (["--reset_state=true", "--allow_non_finite=false"], ["--reset_state", "--no_wait"]),
    (["--reset-state=TRUE", "--allow_non_finite"], ["--reset-state", "--allow_non_finite",
                                                    "--no_wait"]),
    (["--no_wait=true", "--tf1_scope=encoder/rnn=rnn"], ["--no_wait",
                                                         "--tf1_scope=encoder/rnn=rnn"]),
    (["--batch_size=8", "--runner=DataflowRunner"], ["--batch_size=8",
                                                     "--runner=DataflowRunner", "--no_wait"]),
])
def test_boolean_parameters_become_flags_and_the_launcher_never_waits(given, expected):
    assert template.template_arguments(given) == expected


def test_the_metadata_command_prints_and_writes_the_json(tmp_path):
    out = tmp_path / "metadata.json"
    assert template.cli(["metadata", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == template.template_metadata()
    printed = subprocess.run([sys.executable, "-m", "pipeline.template", "metadata"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert json.loads(printed.stdout) == template.template_metadata()


@pytest.fixture
def no_google(monkeypatch):
    """Refuse (and record) any connection to a host other than this machine's."""
    refused = []
    resolve = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            refused.append(host)
            raise OSError(f"test_template: no connection to {host}")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    yield refused
    assert refused == []


@pytest.fixture
def submitted(monkeypatch):
    """Intercept Pipeline.run: keep the pipeline and its runner API proto (what a
    runner is sent: every DoFn pickled), and submit nothing."""
    captured = {}

    def run(pipeline, test_runner_api="AUTO"):
        captured["pipeline"], captured["proto"] = pipeline, pipeline.to_runner_api()
        return PipelineResult(PipelineState.UNKNOWN)

    monkeypatch.setattr(beam.Pipeline, "run", run)
    return captured


def test_the_launcher_builds_the_dataflow_job_from_template_parameters(
        workload, bucket, no_google, submitted, capsys):
    fs = fsspec.filesystem("gs")
    model, chunks = f"{bucket}/model/model.keras", f"{bucket}/chunks/run-1"
    fs.put(workload[0], model)
    for name in sorted(os.listdir(workload[2][0])):
        fs.put(os.path.join(workload[2][0], name), f"{chunks}/{name}")
    parameters = [f"--model={model}", f"--chunks={chunks}", f"--state={bucket}/state",
                  f"--outputs={bucket}/outputs", "--run_id=template-run-1",
                  "--batch_size=8", "--window_steps=16", "--keep=3",
                  "--reset_state=true", "--allow_non_finite=false"]

    assert template.main(parameters + dataflow_arguments(bucket)) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed["submitted"] and printed["run_id"] == "template-run-1"
    assert printed["report"].startswith(f"{bucket}/state/snapshots/template-run-1/")
    pipeline = submitted["pipeline"]
    assert type(pipeline.runner).__name__ == "DataflowRunner"
    options = pipeline.options
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == (
        "my-project", "europe-west1", f"{bucket}/tmp")
    assert options.view_as(WorkerOptions).sdk_container_image == IMAGE
    seqcarry = options.view_as(SeqcarryOptions)
    assert (seqcarry.model, seqcarry.chunks, seqcarry.state, seqcarry.outputs) == (
        model, [chunks], f"{bucket}/state", f"{bucket}/outputs")
    assert (seqcarry.run_id, seqcarry.batch_size, seqcarry.window_steps, seqcarry.keep) == (
        "template-run-1", 8, 16, 3)
    assert seqcarry.reset_state and not seqcarry.allow_non_finite and seqcarry.no_wait
    proto = submitted["proto"]
    assert any(t.spec.urn == "beam:transform:pardo:v1"
               for t in proto.components.transforms.values())
    assert storage.StateStore(f"{bucket}/state").current() is None  # the job never ran


def test_local_paths_are_refused_for_dataflow(tmp_path, capsys):
    code = template.main([f"--model={tmp_path}/model.keras", f"--chunks={tmp_path}/chunks",
                          f"--state={tmp_path}/state", "--outputs=gs://bucket/outputs",
                          *dataflow_arguments("gs://bucket")])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("seqcarry: error: DataflowRunner's workers cannot read")
    assert f"--model {tmp_path}/model.keras" in error and "--outputs" not in error


@pytest.mark.parametrize("parameter, message", [
    ("--batch_sise=8", "unknown option --batch_sise; did you mean --batch-size?"),
    ("--reset_state=yes", "--reset_state=yes: give true or false"),
    ("--no_wait=false", "a Flex Template launch cannot wait for its job"),
])
def test_a_bad_template_parameter_is_refused(parameter, message, capsys):
    code = template.main(["--model=gs://bucket/model.keras", "--chunks=gs://bucket/chunks",
                          "--state=gs://bucket/state", "--outputs=gs://bucket/outputs",
                          parameter, *dataflow_arguments("gs://bucket")])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("seqcarry: error: ") and message in error


def test_the_template_entry_point_exits_2_on_bad_input():
    refused = subprocess.run(
        [sys.executable, "-m", "pipeline.template", "--model=gs://b/m.keras",
         "--no_wait=false"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("seqcarry: error: ")
