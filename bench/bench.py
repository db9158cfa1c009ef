"""``make bench``: steps per second of four ways to run the same LSTM, measured in one
process run on one synthetic workload, and the ratios between them.

  (a) pipeline  seqcarry run end to end: DirectRunner, local Parquet in and out, commit
  (b) keras     plain Keras over the whole sequences in memory, batch 256, tf.function
  (c) seed      one sequence at a time (batch 1), chunk by chunk, (h, c) carried by hand
  (d) kernel    seqcarry's batched step alone, on in-memory arrays

and four scaling cases (bench/scaling.py): a run touching 1% of a 100,000-sequence
snapshot vs the same run against those 1,000 alone, peak RSS for 10x more sequences,
one 60,000-step sequence alone vs with 255 one-step sequences beside it, and
``seqcarry run`` over one small chunk as a command, start to exit;
and the launcher's planning of a run over 10,000 input files on gs:// (fake-gcs-server
behind 50 ms of latency per request, bench/planning.py): seconds, memory, requests.

Default workload (issue 7): 2,048 sequences x 1,024 steps in chunks of 128, input
width 32, one LSTM layer of 128 units, Dense head of 8. ``--scale`` shrinks the number
of sequences (and the planning case's files, down to 1,000) for a quick run. (c) is
timed on a subset: it is slow by design, and a rate does not depend on how many
sequences it is measured over.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench import planning, scaling  # noqa: E402

SEQUENCES, STEPS, CHUNK, INPUT_DIM, UNITS, OUTPUTS = 2048, 1024, 128, 32, 128, 8
KERAS_BATCH = 256
SEED_SEQUENCES = 16
MEMORY_SEQUENCES, MEMORY_STEPS = 256, 512


def workload(root: str, sequences: int) -> tuple[str, np.ndarray, str]:
    """The model file, the features [sequences, steps, input_dim], the chunk directory."""
    import keras

    from pipeline.demo import write_chunk_files
    from schemas import Chunk

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, INPUT_DIM)),
                              keras.layers.LSTM(UNITS, return_sequences=True),
                              keras.layers.Dense(OUTPUTS)])
    model_path = os.path.join(root, "model.keras")
    model.save(model_path)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(sequences, STEPS, INPUT_DIM)).astype(np.float32)
    chunks = [Chunk(f"seq-{s:05d}", c, features[s, c * CHUNK:(c + 1) * CHUNK])
              for s in range(sequences) for c in range(STEPS // CHUNK)]
    chunk_dir = os.path.join(root, "chunks")
    write_chunk_files(chunk_dir, chunks, files=16, rng=rng)
    return model_path, features, chunk_dir


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def pipeline_rate(root: str, model_path: str, chunk_dir: str) -> tuple[float, dict]:
    from pipeline.build import run_job
    from pipeline.options import RunConfig

    config = RunConfig(model=model_path, chunks=chunk_dir, state=os.path.join(root, "state"),
                       outputs=os.path.join(root, "outputs"), run_id="bench")
    report = run_job(config, ["--direct_running_mode=in_memory"])
    return report["steps_processed"] / report["seconds"], report


def keras_rate(model_path: str, features: np.ndarray) -> float:
    import keras
    import tensorflow as tf

    model = keras.models.load_model(model_path)
    call = tf.function(model)
    call(features[:KERAS_BATCH])  # trace outside the timing

    def run():
        for start in range(0, len(features), KERAS_BATCH):
            call(features[start:start + KERAS_BATCH]).numpy()
    return features.shape[0] * STEPS / timed(run)


def seed_rate(model_path: str, features: np.ndarray) -> float:
    """The seed's way: one session per sequence, feeding (h, c) back chunk by chunk."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(model_path)
    lstm, dense = model.layers
    twin = keras.layers.LSTM.from_config(lstm.get_config() | {"return_state": True})
    inputs = keras.Input((None, INPUT_DIM))
    h0, c0 = keras.Input((UNITS,)), keras.Input((UNITS,))
    sequence, h, c = twin(inputs, initial_state=[h0, c0])
    twin.set_weights(lstm.get_weights())
    step = tf.function(keras.Model([inputs, h0, c0], [dense(sequence), h, c]))
    zeros = np.zeros((1, UNITS), np.float32)
    step([features[:1, :CHUNK], zeros, zeros])
    subset = features[:SEED_SEQUENCES]

    def run():
        for sequence in subset:
            h, c = zeros, zeros
            for start in range(0, STEPS, CHUNK):
                _, h, c = step([sequence[None, start:start + CHUNK], h, c])
                h, c = h.numpy(), c.numpy()  # saved between sessions, as in the seed
    return len(subset) * STEPS / timed(run)


def kernel_rate(model_path: str, features: np.ndarray) -> float:
    from transforms.kernel import StepKernel
    from transforms.models import load_model

    stack = load_model(model_path)
    kernel = StepKernel(stack)
    batch = KERAS_BATCH
    zeros = [np.zeros((batch, size), np.float32) for size in stack.state_sizes]
    lengths = np.full(batch, STEPS)

    def run_rows(rows):
        kernel.run(rows, lengths[:len(rows)], [z[:len(rows)] for z in zeros])

    # Compiled outside the timing on the shapes timed, as keras_rate traces Keras on a
    # whole batch (a warm-up on one chunk compiled the full-width window in the timing).
    run_rows(features[:batch])
    return features.shape[0] * STEPS / timed(
        lambda: [run_rows(features[start:start + batch])
                 for start in range(0, len(features), batch)])


def decode_seconds(chunk_dir: str) -> float:
    """Seconds to decode every input file, in the read stage's batches: what any pipeline
    over these files pays before it computes."""
    import glob

    import storage
    from transforms.dofns import READ_BATCH_BYTES

    def run():
        for path in sorted(glob.glob(os.path.join(chunk_dir, "*.parquet"))):
            with storage.ParquetInput(path) as parquet:
                for _ in parquet.batches(READ_BATCH_BYTES):
                    pass
    return timed(run)


def pipeline_floor(steps: int, rates: dict, decoding: float, small: dict) -> dict:
    """A lower bound of the pipeline's seconds on this machine, from parts measured in
    this run: decoding the inputs, the kernel's compute, and a small run's job (Beam's
    fixed cost, the model load, one compile, the commit); each must happen, and reading
    ends before computing begins (the join by bucket). Staging, validation, planning and
    writing are left out, so the true floor is higher. Hence the most a/b can be here."""
    parts = {"decode": decoding, "compute": steps / rates["d_kernel"],
             "fixed": small["job_seconds"]}
    seconds = sum(parts.values())
    return {"parts_seconds": parts, "seconds": seconds,
            "keras_seconds": steps / rates["b_keras"],
            "most_a_over_b": steps / rates["b_keras"] / seconds}


def recurrent_matmul_rate(batch: int = KERAS_BATCH, steps: int = 2048) -> float:
    """The machine's ceiling for this LSTM: row-steps per second of its matrix products
    alone, ``[x_t, h] @ W`` ([rows, input + units] @ [input + units, 4 * units]) with
    h fed back (so, like the LSTM, each step waits for the one before), one XLA loop
    per core on its share of the rows, run concurrently as the kernel runs its shards."""
    import tensorflow as tf

    from transforms.kernel import MIN_SHARD_ROWS, _default_shards

    shards = max(1, min(_default_shards(), batch // MIN_SHARD_ROWS))
    weights = tf.constant(np.random.default_rng(1).normal(
        0, 0.05, (INPUT_DIM + UNITS, 4 * UNITS)).astype(np.float32))
    inputs = tf.constant(np.random.default_rng(2).normal(
        size=(steps, batch // shards, INPUT_DIM)).astype(np.float32))

    @tf.function(jit_compile=True)
    def chain(inputs, h):
        def body(t, h):
            gates = tf.matmul(tf.concat([inputs[t], h], 1), weights)
            # Every column feeds back, so XLA cannot drop part of the product.
            return t + 1, tf.tanh(tf.reduce_sum(tf.reshape(gates, [-1, 4, UNITS]), 1))
        return tf.while_loop(lambda t, _: t < steps, body, (tf.constant(0), h))[1]

    @tf.function
    def concurrently(inputs, h):
        return [chain(inputs, h) for _ in range(shards)]  # independent: in parallel

    h = tf.zeros((batch // shards, UNITS))
    concurrently(inputs, h)  # compile outside the timing
    return shards * (batch // shards) * steps / timed(
        lambda: [part.numpy() for part in concurrently(inputs, h)])


def flops_per_step() -> int:
    """Multiply-adds x 2 of one row-step of the bench model (LSTM and Dense)."""
    return 2 * (INPUT_DIM + UNITS) * 4 * UNITS + 2 * UNITS * OUTPUTS


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the 2,048 sequences to use (default 1.0)")
    parser.add_argument("--workdir", default="build/bench")
    parser.add_argument("--out", default="build/bench.json")
    args = parser.parse_args(argv)

    sequences = max(KERAS_BATCH, int(SEQUENCES * args.scale))
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    model_path, features, chunk_dir = workload(args.workdir, sequences)
    print(f"workload: {sequences} sequences x {STEPS} steps, chunks of {CHUNK}, input "
          f"{INPUT_DIM}, LSTM {UNITS}, Dense {OUTPUTS}")
    rates = {}
    rates["a_pipeline"], report = pipeline_rate(args.workdir, model_path, chunk_dir)
    rates["b_keras"] = keras_rate(model_path, features)
    rates["c_seed"] = seed_rate(model_path, features)
    rates["d_kernel"] = kernel_rate(model_path, features)
    decoding = decode_seconds(chunk_dir)
    ceiling = recurrent_matmul_rate()
    incremental = scaling.incremental(args.workdir, model_path, INPUT_DIM)
    memory = scaling.memory(args.workdir, model_path, INPUT_DIM,
                            max(32, int(MEMORY_SEQUENCES * args.scale)), MEMORY_STEPS)
    padding = scaling.padding(args.workdir, model_path, INPUT_DIM)
    small = scaling.small_run(args.workdir, model_path, INPUT_DIM)
    planned = planning.bench_planning(max(1_000, int(planning.FILES * args.scale)))
    floor = pipeline_floor(sequences * STEPS, rates, decoding, small)
    ratios = {"a/b": rates["a_pipeline"] / rates["b_keras"],
              "a/c": rates["a_pipeline"] / rates["c_seed"],
              "d/b": rates["d_kernel"] / rates["b_keras"]}
    targets = {"a/b": 1.0, "a/c": 15.0, "d/b": 2.5}  # issue 18
    print(f"\n{'way':<12}{'steps/s':>14}")
    for name, rate in rates.items():
        print(f"{name:<12}{rate:>14,.0f}")
    print(f"\n{'ratio':<8}{'measured':>10}{'target':>9}")
    for name, value in ratios.items():
        print(f"{name:<8}{value:>10.2f}{targets[name]:>9.1f}"
              f"{'' if value >= targets[name] else '   (missed)'}")
    gflops = rates["d_kernel"] * flops_per_step() / 1e9
    print(f"\nkernel: {gflops:.0f} GFLOP/s, {rates['d_kernel'] / ceiling:.0%} of its matrix "
          f"products alone in a recurrent chain ({ceiling * flops_per_step() / 1e9:.0f} "
          "GFLOP/s)")
    stages = report["stage_seconds"]
    print(f"\npipeline: {report['seconds']:.2f} s wall; in stages (summed over workers): "
          + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in stages.items())
          + "; Beam start-up and the join: the rest")
    parts = floor["parts_seconds"]
    print(f"floor: decoding the inputs {parts['decode']:.2f} s + the kernel's compute "
          f"{parts['compute']:.2f} s + a small run's job (Beam, model load, one compile, "
          f"commit) {parts['fixed']:.2f} s = {floor['seconds']:.2f} s, against plain Keras' "
          f"{floor['keras_seconds']:.2f} s: here a/b cannot exceed "
          f"{floor['most_a_over_b']:.2f}")
    print(f"\nincremental: a run touching {incremental['touched']:,} sequences took "
          f"{incremental['seconds_large']:.2f} s against a {incremental['snapshot']:,}-"
          f"sequence snapshot, {incremental['seconds_small']:.2f} s against one holding "
          f"only them: {incremental['ratio']:.2f}x (target <= 1.5)")
    print(f"memory: peak RSS {memory['peak_rss_mib_1x']:,.0f} MiB for {memory['sequences']:,} "
          f"sequences x {memory['steps']} steps, {memory['peak_rss_mib_10x']:,.0f} MiB for "
          f"10x as many: {memory['ratio']:.2f}x (target <= 1.2)")
    print(f"padding: one {padding['long_steps']:,}-step sequence alone "
          f"{padding['seconds_alone']:.2f} s, {padding['peak_rss_mib_alone']:,.0f} MiB; with "
          f"{padding['short_sequences']} one-step sequences beside it "
          f"{padding['seconds_with_short']:.2f} s, {padding['peak_rss_mib_with_short']:,.0f} "
          f"MiB: {padding['time_ratio']:.2f}x time, {padding['rss_ratio']:.2f}x memory "
          "(target <= 1.3 each)")
    print(f"small run: `seqcarry run` over one {scaling.CHUNK_STEPS}-step chunk "
          f"{small['wall_seconds']:.2f} s start to exit, its job {small['job_seconds']:.2f} "
          f"s (target < 2.5 s); a fresh interpreter imports TensorFlow in "
          f"{small['import_tensorflow_seconds']:.2f} s, Beam in "
          f"{small['import_beam_seconds']:.2f} s")
    print(planning.summary_line(planned))
    result = {"sequences": sequences, "steps": STEPS, "chunk": CHUNK, "rates": rates,
              "kernel_fraction_of_matmul_chain": rates["d_kernel"] / ceiling,
              "matmul_chain_row_steps_per_second": ceiling,
              "ratios": ratios, "targets": targets, "pipeline_floor": floor,
              "incremental": incremental,
              "memory": memory, "padding": padding, "small_run": small, "planning": planned,
              "pipeline_report": report}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
