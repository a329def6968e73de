"""charrnn: a reproducible character-level LSTM language model pipeline."""

import os

# TensorFlow's C++ start-up chatter (CPU feature notes, "failed call to cuInit" on machines
# without a GPU) hides the lines that matter; Python-level errors are unaffected.
# Set TF_CPP_MIN_LOG_LEVEL=0 to see it again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
