"""A Python SDK worker boot for Beam's PROCESS environment (and the worker pool's
--container_executable), run from this project's venv.

Beam's runners start it as `BOOT --id=ID --provision_endpoint=HOST:PORT
--control_endpoint=... --logging_endpoint=... --artifact_endpoint=...`. Like the boot
binary of Beam's SDK container, it asks the provision service for the job's pipeline
options and starts `sdk_worker_main`; unlike it, it installs nothing: the venv already
holds seqcarry and its dependencies (staged artifacts are ignored).
"""
import argparse
import json
import os
import sys
import tempfile

import grpc
from google.protobuf import json_format, text_format

from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc
from apache_beam.portability.api import endpoints_pb2


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for name in ("id", "provision_endpoint", "control_endpoint", "logging_endpoint",
                 "artifact_endpoint", "semi_persist_dir"):
        parser.add_argument("--" + name, default="")
    args, _ = parser.parse_known_args(argv)
    # Prism passes --id='job-001[job]_...' with the quotes in the value
    args.id = args.id.strip("'\"")

    channel = grpc.insecure_channel(args.provision_endpoint)
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
    info = stub.GetProvisionInfo(beam_provision_api_pb2.GetProvisionInfoRequest(),
                                 metadata=[("worker_id", args.id)]).info
    channel.close()

    def descriptor(url: str) -> str:
        return text_format.MessageToString(endpoints_pb2.ApiServiceDescriptor(url=url))

    env = os.environ
    env["WORKER_ID"] = args.id
    env["PIPELINE_OPTIONS"] = json.dumps(json_format.MessageToDict(info.pipeline_options))
    control = info.control_endpoint.url or args.control_endpoint
    logging_url = info.logging_endpoint.url or args.logging_endpoint
    env["CONTROL_API_SERVICE_DESCRIPTOR"] = descriptor(control)
    if logging_url:
        env["LOGGING_API_SERVICE_DESCRIPTOR"] = descriptor(logging_url)
    if info.runner_capabilities:
        env["RUNNER_CAPABILITIES"] = " ".join(info.runner_capabilities)
    env["SEMI_PERSISTENT_DIRECTORY"] = args.semi_persist_dir or tempfile.mkdtemp(
        prefix="beam-sdk-")

    from apache_beam.runners.worker import sdk_worker_main
    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main(sys.argv[1:])
