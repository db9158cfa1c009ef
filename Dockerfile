# Two images from one file. The base is Beam's own SDK image, so the Beam version on
# workers matches the one that submits the job (keep them equal).
#
# worker (the default target): the worker image for custom-container runs on Dataflow
# (--sdk_container_image) or on Flink with --environment_type=DOCKER (docs/runners.md).
#   docker build -t REGISTRY/seqcarry-worker:0.1.0 .    (same as --target worker)
#   docker push REGISTRY/seqcarry-worker:0.1.0
#
# launcher: the worker image plus Dataflow's Flex Template launcher, so one image both
# launches a template's job and runs its workers (docs/flex-template.md).
#   docker build --target launcher -t REGISTRY/seqcarry-launcher:0.1.0 .
#   docker push REGISTRY/seqcarry-launcher:0.1.0
# Google's base images for Flex Templates: the `latest` tag is their recommended release;
# pin one with --build-arg LAUNCHER_BASE=...:TAG.
ARG LAUNCHER_BASE=gcr.io/dataflow-templates-base/python311-template-launcher-base:latest

FROM ${LAUNCHER_BASE} AS template-launcher-base

FROM apache/beam_python3.11_sdk:2.77.0 AS worker

WORKDIR /opt/seqcarry
COPY setup.py README.md constraints.txt ./
COPY pipeline ./pipeline
COPY transforms ./transforms
COPY schemas ./schemas
COPY storage ./storage
# tensorflow-cpu; swap `cpu` for `gpu` on a GPU image.
# The tested versions (constraints.txt: Beam 2.77, as the base image).
RUN pip install --no-cache-dir -c constraints.txt '.[cpu]'

FROM worker AS launcher

COPY --from=template-launcher-base /opt/google/dataflow/python_template_launcher \
    /opt/google/dataflow/python_template_launcher
# The file Dataflow's launcher runs with the template's parameters (as --name=value):
# pipeline.template.launch, which submits the job and exits.
RUN printf 'from pipeline.template import launch\n\nlaunch()\n' > /opt/seqcarry/launch.py
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/opt/seqcarry/launch.py
# No FLEX_TEMPLATE_PYTHON_SETUP_FILE or _REQUIREMENTS_FILE: seqcarry and TensorFlow are
# installed above and this image is also the workers' (sdk_container_image); Google
# leaves both out for such an image, and a setup file would only make every worker
# reinstall seqcarry at start-up.
# The entry point stays Beam's worker boot (/opt/apache/beam/boot) for the workers, as
# in Google's sample of an image that is both (python-docs-samples,
# dataflow/flex-templates/pipeline_with_dependencies).

# `docker build .` without --target builds the last stage: the worker image, as before.
FROM worker
