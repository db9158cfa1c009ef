"""An independent float64 numpy LSTM: the oracle for the kernel's unit tests.

Written from the LSTM equations (Keras gate order i, f, c, o), sharing no code with
seqcarry's kernel.
"""
import numpy as np


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm(features, layers, head=(), initial=None):
    """Run stacked LSTM layers [(kernel, recurrent_kernel, bias)] and dense head
    [(kernel, bias)] over one sequence [steps, input_dim] in float64.

    ``initial`` is [(h, c)] per layer (zeros when None). Returns outputs
    [steps, output_dim] and the final [(h, c)] per layer.
    """
    sequence = np.asarray(features, np.float64)
    finals = []
    for index, (kernel, recurrent_kernel, bias) in enumerate(layers):
        units = recurrent_kernel.shape[0]
        h, c = ((np.zeros(units), np.zeros(units)) if initial is None
                else (np.asarray(initial[index][0], np.float64),
                      np.asarray(initial[index][1], np.float64)))
        hs = []
        for x in sequence:
            z = x @ kernel.astype(np.float64) + h @ recurrent_kernel.astype(np.float64) + bias
            i, f, g, o = np.split(z, 4)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
            hs.append(h)
        sequence = np.stack(hs) if hs else np.zeros((0, units))
        finals.append((h, c))
    for kernel, bias in head:
        sequence = sequence @ kernel.astype(np.float64) + bias
    return sequence, finals
