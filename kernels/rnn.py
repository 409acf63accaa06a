"""LSTM and GRU as pure functions: ``jaxcore.kernels.rnn``."""
