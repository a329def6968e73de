"""charrnn: a reproducible character-level LSTM language model pipeline."""

__version__ = "0.1.0"
