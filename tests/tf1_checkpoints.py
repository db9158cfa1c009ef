"""Real TF1 checkpoints and their oracle, written by TF1 graph code the way the seed's
users wrote them: ``tf.compat.v1`` cells, ``dynamic_rnn``, ``tf.train.Saver``.

Run as ``TF_USE_LEGACY_KERAS=1 python -m tests.tf1_checkpoints OUT_DIR`` (the TF1
cells need the legacy tf-keras); the ``tf1_checkpoints`` fixture does, once per test
session. For each model ``OUT_DIR/<name>/`` gets the checkpoint and ``oracle.npz``:
``inputs`` [N, T, D] (right-padded), ``lengths`` [N], and what TF1 computes for the
whole sequences in a session: ``outputs`` [N, T, O] and ``state_<k>`` [N, size], the
final states in seqcarry's order (h, c of each LSTM layer, h of each GRU layer).
"""
import os
import sys

import numpy as np

INPUT_DIM = 3
SEQUENCES = 12
MAX_STEPS = 60


def _final_states(cells, state):
    """TF1's final state structure -> seqcarry's order (LSTMStateTuple is (c, h))."""
    ordered = []
    for cell, part in zip(cells, state if len(cells) > 1 else (state,)):
        ordered += [part.h, part.c] if hasattr(part, "h") else [part]
    return ordered


def write(directory, build, seed, saved=None):
    """Build a graph with ``build(inputs, lengths) -> (cells, outputs, state)``,
    give every variable random values, save it and its whole-sequence oracle.

    ``saved`` chooses the variables to save (default: all), for broken checkpoints.
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, MAX_STEPS + 1, SEQUENCES)
    lengths[0] = MAX_STEPS
    inputs = rng.normal(size=(SEQUENCES, MAX_STEPS, INPUT_DIM)).astype(np.float32)
    inputs *= (np.arange(MAX_STEPS)[None, :] < lengths[:, None])[:, :, None]
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, None, INPUT_DIM])
        length = v1.placeholder(tf.int32, [None])
        cells, outputs, state = build(x, length)
        variables = v1.global_variables()
        saver = v1.train.Saver(var_list=saved(variables) if saved else None)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            for variable in variables:  # biases too: nothing may hide behind zeros
                variable.load(rng.normal(0, 0.5, variable.shape).astype(np.float32), session)
            results = session.run([outputs] + _final_states(cells, state),
                                  {x: inputs, length: lengths})
            os.makedirs(directory, exist_ok=True)
            saver.save(session, os.path.join(directory, "model.ckpt"))
    np.savez(os.path.join(directory, "oracle.npz"), inputs=inputs, lengths=lengths,
             outputs=results[0], **{f"state_{k}": s for k, s in enumerate(results[1:])})


def main(out):
    import tensorflow as tf

    v1 = tf.compat.v1
    v1.disable_eager_execution()
    rnn_cell = v1.nn.rnn_cell

    def rnn(cells, x, length, scope=None):
        cell = cells[0] if len(cells) == 1 else rnn_cell.MultiRNNCell(cells)
        return v1.nn.dynamic_rnn(cell, x, sequence_length=length, dtype=tf.float32,
                                 scope=scope)

    def seed_style(x, length):
        # The seed's model: one BasicLSTMCell, a softmax_w/softmax_b projection.
        cells = [rnn_cell.BasicLSTMCell(8)]
        outputs, state = rnn(cells, x, length)
        w, b = v1.get_variable("softmax_w", [8, 2]), v1.get_variable("softmax_b", [2])
        return cells, tf.einsum("btu,uo->bto", outputs, w) + b, state

    def peephole_projection(x, length):
        cells = [rnn_cell.LSTMCell(7, use_peepholes=True, num_proj=4),
                 rnn_cell.LSTMCell(5, use_peepholes=True),
                 rnn_cell.LSTMCell(6, num_proj=3)]
        outputs, state = rnn(cells, x, length)
        return cells, v1.layers.dense(outputs, 2, name="output"), state

    def gru_stack(x, length):
        cells = [rnn_cell.GRUCell(6), rnn_cell.BasicLSTMCell(5, forget_bias=0.25),
                 rnn_cell.GRUCell(4)]
        outputs, state = rnn(cells, x, length)
        return cells, outputs, state

    def two_rnns(scope):
        def build(x, length):
            # Two RNNs side by side; the encoder's cell has a name of its own.
            with v1.variable_scope("encoder"):
                encoder = [rnn_cell.BasicLSTMCell(5, name="my_cell")]
                encoded = rnn(encoder, x, length)
            with v1.variable_scope("decoder"):
                decoder = [rnn_cell.GRUCell(4)]
                decoded = rnn(decoder, x, length)
            cells, (outputs, state) = ((encoder, encoded) if scope == "encoder"
                                       else (decoder, decoded))
            return cells, outputs, state
        return build

    def bidirectional(x, length):
        cells = [rnn_cell.BasicLSTMCell(3), rnn_cell.BasicLSTMCell(3)]
        outputs, states = v1.nn.bidirectional_dynamic_rnn(
            *cells, x, sequence_length=length, dtype=tf.float32)
        return cells[:1], tf.concat(outputs, -1), states[0]  # the forward half's oracle

    write(os.path.join(out, "seed_style"), seed_style, 1)
    write(os.path.join(out, "peephole_projection"), peephole_projection, 2)
    write(os.path.join(out, "gru_stack"), gru_stack, 3)
    for scope in ("encoder", "decoder"):  # same seed: same variables, two oracles
        write(os.path.join(out, f"two_rnns_{scope}"), two_rnns(scope), 4)
    write(os.path.join(out, "bidirectional"), bidirectional, 6)
    write(os.path.join(out, "bias_not_saved"), seed_style, 5,
          saved=lambda variables: [v for v in variables if not v.name.endswith("bias:0")])


if __name__ == "__main__":
    main(sys.argv[1])
