# Worker image for custom-container runs on Dataflow (--sdk_container_image) or on
# Flink with --environment_type=DOCKER. The base is Beam's own SDK image, so the Beam
# version on workers matches the one that submits the job (keep them equal).
#   docker build -t REGISTRY/seqcarry-worker:0.1.0 .
#   docker push REGISTRY/seqcarry-worker:0.1.0
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/seqcarry
COPY setup.py README.md ./
COPY pipeline ./pipeline
COPY transforms ./transforms
COPY schemas ./schemas
COPY storage ./storage
# tensorflow-cpu; swap `cpu` for `gpu` on a GPU image.
RUN pip install --no-cache-dir '.[cpu]'
