"""``seqcarry selfcheck``: run a user's own model through seqcarry's kernel and compare
it with what the model's own framework computes on each whole sequence.

Inputs are random sequences of the model's input width (token ids in
[0, vocabulary) for a model that starts with an ``Embedding``), 1 to ``max_steps``
steps each, or the sequences of the user's chunk files. For each compiled path of the
kernel (XLA and plain ``tf.function``) every sequence is cut into chunks of random
sizes (one-step chunks included) and the chunks are applied in rounds of random batch
compositions (a random subset of the sequences, each with one to a few of its next
chunks, rows of different lengths), through :func:`transforms.sequencing.run_batch`
with the state carried between calls as a run carries it. The concatenated per-step
outputs and the final states are compared with the **oracle**:

=================  ===========================================================
format             oracle
=================  ===========================================================
``keras``          Keras on the whole sequence (:func:`keras_whole_sequence`)
``tf-checkpoint``  the same, on the architecture restored by ``tf.train.Checkpoint``
``savedmodel``     the model's own ``step`` signature, called step by step (batch 1)
``tf1-checkpoint`` not supported (its own math runs only in a TF1 graph)
=================  ===========================================================
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

import storage
from schemas import CarriedState, Chunk, InputError

if TYPE_CHECKING:
    from transforms.models import ModelOptions, RecurrentStack, StepFunctionLayer

# (features [steps, input_dim]) -> (outputs [steps, output_dim], final state parts)
Oracle = Callable[[np.ndarray], tuple[np.ndarray, list[np.ndarray]]]
SUPPORTED_FORMATS = ("keras", "tf-checkpoint", "savedmodel")
# Most chunks one sequence contributes to one batch.
MAX_CHUNKS_PER_WORK = 3


def selfcheck(model: str, options: "ModelOptions | None" = None, *, sequences: int = 16,
              max_steps: int = 200, seed: int = 0, tolerance: float = 1e-5,
              chunks: Sequence[str] = (), window_steps: int = 256) -> dict:
    """Check that seqcarry computes what ``model`` computes (see the module docstring).

    ``options``: a :class:`~transforms.models.ModelOptions`. ``chunks``: chunk files,
    folders or globs to take up to ``sequences`` sequences from (a random sample,
    chunks in ``chunk_index`` order, the first ``max_steps`` steps of each) instead of
    random features. Returns a JSON-able summary whose ``ok`` is the verdict and
    ``worst`` names the largest difference. Raises :class:`InputError` or
    :class:`~transforms.models.ModelError` (exit 2) for bad arguments, a TF1 checkpoint,
    or chunk files without a valid sequence.
    """
    from transforms.models import load_model

    if sequences < 1 or max_steps < 1 or window_steps < 1:
        raise InputError("--sequences, --max-steps and --window-steps must be at least 1")
    if not tolerance >= 0:
        raise InputError(f"--tolerance must be >= 0, not {tolerance}")
    stack = load_model(model, options)
    oracle = model_oracle(stack, options)
    rng = np.random.default_rng(seed)
    whole = (read_sequences(chunks, stack, sequences, max_steps, rng) if chunks
             else random_sequences(stack, sequences, max_steps, rng))
    expected = {sequence_id: oracle(features) for sequence_id, features in whole.items()}
    paths = {}
    for name, xla in (("xla", True), ("plain", False)):
        paths[name] = compare(stack, whole, expected, rng, xla=xla,
                              window_steps=window_steps)
    return verdict(stack, whole, paths, tolerance,
                   source="chunk files" if chunks else "random")


def model_oracle(stack: "RecurrentStack", options: "ModelOptions | None" = None) -> Oracle:
    """The model's own framework on one whole sequence, from zero states (``options``:
    the :class:`~transforms.models.ModelOptions` the stack was loaded with)."""
    from transforms.models import ModelOptions
    from transforms.reference import keras_whole_sequence

    path = stack.source.partition(":")[2]
    if stack.format == "keras":
        return keras_whole_sequence(path)
    if stack.format == "tf-checkpoint":
        architecture = (options or ModelOptions()).architecture
        return keras_whole_sequence(_restored_keras(path, architecture))
    if stack.format == "savedmodel":
        return _step_signature_oracle(stack.recurrent[0])
    raise InputError(
        f"selfcheck supports {', '.join(SUPPORTED_FORMATS)} models, not {stack.format}: "
        "a TF1 checkpoint's own math runs only in a TF1 graph (compare with your TF1 "
        "code's outputs instead, or check a .keras copy of its weights: same fingerprint)")


def _restored_keras(prefix: str, architecture: str):
    """The checkpoint restored into its architecture by TensorFlow itself."""
    import tensorflow as tf
    from transforms.models import object_graph, read_keras

    model = read_keras(storage.local_copy(architecture))
    children = [child.local_name for child in object_graph(prefix).nodes[0].children
                if child.local_name not in ("save_counter", "optimizer")]
    root = "model" if "model" in children else children[0]
    tf.train.Checkpoint(**{root: model}).read(prefix).expect_partial()
    return model


def _step_signature_oracle(layer: "StepFunctionLayer") -> Oracle:
    """A SavedModel's ``step`` signature called once per step, batch 1, zero states."""
    import tensorflow as tf

    def whole_sequence(features: np.ndarray):
        states = {name: tf.zeros([1, size]) for name, size in
                  zip(layer.names, layer.state_sizes)}
        outputs = []
        for x in features:
            result = layer.function(x=tf.constant(x[None]), **states)
            outputs.append(result["outputs"].numpy()[0])
            states = {name: result[name] for name in layer.names}
        return np.stack(outputs), [states[name].numpy()[0] for name in layer.names]

    return whole_sequence


def random_sequences(stack: "RecurrentStack", count: int, max_steps: int,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``count`` sequences of 1 to ``max_steps`` steps (one of exactly 1 step and one of
    ``max_steps`` among them): normal features, or token ids for an embedding."""
    lengths = rng.integers(1, max_steps + 1, count)
    lengths[0], lengths[-1] = 1, max_steps
    whole = {}
    for number, steps in enumerate(lengths):
        shape = (int(steps), stack.input_dim)
        whole[f"selfcheck-{number:05d}"] = (
            rng.integers(0, stack.vocabulary, shape) if stack.vocabulary
            else rng.normal(size=shape)).astype(np.float32)
    return whole


def read_sequences(patterns: Sequence[str], stack: "RecurrentStack", count: int, max_steps: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Up to ``count`` sequences of the chunk files (a random sample): each one's valid
    chunks in ``chunk_index`` order (one per index), its first ``max_steps`` steps."""
    from schemas.validation import validate_chunks

    by_sequence: dict[str, dict[int, Chunk]] = collections.defaultdict(dict)
    urls = sorted({url for pattern in patterns for url, _ in storage.list_files(pattern)})
    if not urls:
        raise InputError(f"no chunk file matches {' '.join(patterns)}")
    for url in urls:
        valid, _ = validate_chunks(storage.read_table(url), url, stack.input_dim,
                                   vocabulary=stack.vocabulary)
        for chunk in valid:
            by_sequence[chunk.sequence_id].setdefault(chunk.chunk_index, chunk)
    if not by_sequence:
        raise InputError(f"{len(urls)} chunk file(s) hold no valid chunk for this model "
                         f"(input width {stack.input_dim})")
    ids = sorted(by_sequence)
    chosen = sorted(ids[i] for i in rng.choice(len(ids), min(count, len(ids)), replace=False))
    return {sequence_id: np.concatenate(
                [by_sequence[sequence_id][index].features
                 for index in sorted(by_sequence[sequence_id])])[:max_steps]
            for sequence_id in chosen}


def random_chunks(rng: np.random.Generator, sequence_id: str,
                  features: np.ndarray) -> list[Chunk]:
    """``features`` cut into chunks of random sizes: each sequence draws a largest
    size (1: all one-step chunks, up to the whole sequence), then sizes 1 to it."""
    from pipeline.demo import cut_into_chunks

    largest = int(rng.choice([1, 3, 17, 64, max(1, len(features))]))
    return cut_into_chunks(rng, sequence_id, features, max_chunk=largest)


def compare(stack: "RecurrentStack", whole: dict[str, np.ndarray],
            expected: dict[str, tuple[np.ndarray, list[np.ndarray]]],
            rng: np.random.Generator, *, xla: bool, window_steps: int = 256) -> dict:
    """Run ``whole`` through a :class:`StepKernel` in random chunks and random batches,
    state carried between calls, and compare with ``expected`` (the oracle's outputs
    and final states per sequence). Returns the largest absolute differences, the
    sequence each was found on, and the number of kernel calls."""
    from transforms.kernel import StepKernel
    from transforms.sequencing import SequenceWork, run_batch

    kernel = StepKernel(stack, window_steps, xla=xla)
    queues = {sequence_id: collections.deque(random_chunks(rng, sequence_id, features))
              for sequence_id, features in whole.items()}
    carried = {sequence_id: CarriedState(sequence_id, 0, 0, stack.zero_state(),
                                         stack.fingerprint) for sequence_id in whole}
    produced: dict[str, list[np.ndarray]] = {sequence_id: [] for sequence_id in whole}
    calls = batch_rows = 0
    while active := [sequence_id for sequence_id, queue in queues.items() if queue]:
        size = int(rng.integers(1, len(active) + 1))
        works = []
        for sequence_id in rng.permutation(active)[:size]:
            queue = queues[sequence_id]
            take = min(len(queue), int(rng.integers(1, MAX_CHUNKS_PER_WORK + 1)))
            works.append(SequenceWork(carried[sequence_id],
                                      tuple(queue.popleft() for _ in range(take))))
        result = run_batch(kernel, works)
        calls, batch_rows = calls + 1, batch_rows + len(works)
        for output in result.outputs:
            produced[output.sequence_id].append(output.outputs)
        for state in result.states:
            carried[state.sequence_id] = state
    outputs_diff = states_diff = 0.0
    worst_outputs = worst_states = None
    for sequence_id, (want_outputs, want_states) in expected.items():
        got = np.concatenate(produced[sequence_id])
        diff = _max_diff(got, want_outputs)
        if diff > outputs_diff or worst_outputs is None:
            outputs_diff, worst_outputs = max(diff, outputs_diff), sequence_id
        diff = max(_max_diff(g, w) for g, w in zip(carried[sequence_id].tensors, want_states,
                                                    strict=True))
        if diff > states_diff or worst_states is None:
            states_diff, worst_states = max(diff, states_diff), sequence_id
    return {"xla": kernel.xla, "kernel_calls": calls,
            "mean_batch_rows": round(batch_rows / max(calls, 1), 2),
            "outputs_max_abs_diff": outputs_diff, "outputs_worst_sequence": worst_outputs,
            "states_max_abs_diff": states_diff, "states_worst_sequence": worst_states}


def _max_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference; infinite when shapes differ or a value is NaN."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.shape != want.shape:
        return float("inf")
    diff = np.abs(got - want)
    return float("inf") if np.isnan(diff).any() else float(diff.max(initial=0.0))


def verdict(stack: "RecurrentStack", whole: dict[str, np.ndarray], paths: dict[str, dict],
            tolerance: float, source: str = "random") -> dict:
    """The summary: model, inputs, each path's differences, and ``ok`` when every
    difference is within ``tolerance``; ``worst`` names the largest one."""
    found = [(result[f"{what}_max_abs_diff"], name, what, result[f"{what}_worst_sequence"])
             for name, result in paths.items() for what in ("outputs", "states")]
    diff, path, what, sequence_id = max(found, key=lambda item: item[0])
    lengths = [len(features) for features in whole.values()]
    return {"model": stack.source.partition(":")[2], "format": stack.format,
            "fingerprint": stack.fingerprint, "inputs": source,
            "sequences": len(whole), "steps": int(sum(lengths)),
            "min_steps": int(min(lengths)), "max_steps": int(max(lengths)),
            "paths": paths, "tolerance": tolerance,
            "worst": {"path": path, "what": what, "sequence": sequence_id,
                      "max_abs_diff": diff},
            "ok": bool(diff <= tolerance)}


def result_line(summary: dict) -> str:
    """The last line people read: ``seqcarry: ok: selfcheck ...`` or the failure."""
    worst = summary["worst"]
    if summary["ok"]:
        return (f"seqcarry: ok: selfcheck {summary['format']} model: "
                f"{summary['sequences']} sequences, {summary['steps']} steps, XLA and plain "
                f"paths match the model within {worst['max_abs_diff']:.3g} "
                f"(tolerance {summary['tolerance']:g})")
    return (f"seqcarry: error: selfcheck failed: {worst['path']} path's {worst['what']} of "
            f"sequence {worst['sequence']} differ by {worst['max_abs_diff']:.3g} "
            f"(tolerance {summary['tolerance']:g})")
