"""The registered model's code: MLflow logs this file with the model ("model from code": nothing is
pickled) and runs it to load the model, a prime in and generated text out.

Kept apart from ``serving`` because ``mlflow.models.set_model`` must run at the file's import: only
MLflow imports this module, so importing the package has no such side effect.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from charrnn import seams
from charrnn.sampling import SamplingOptions
from charrnn.serving import DEFAULTS, MODEL_DIR_ARTIFACT, primes_of


# The explicit signature (below) validates inputs and params; MLflow's type-hint wrapper would only warn
# that predict has no hints, at every import.
class TextGenerator(seams.python_model_without_type_hints()):
    """``predict(primes)`` -> one generated text per prime, each starting with its prime. Loaded
    (``mlflow.pyfunc.load_model(uri).unwrap_python_model()``), ``.model`` is the Keras model
    (ids -> logits) and ``.vocabulary`` its vocabulary."""

    def load_context(self, context):
        from charrnn.quiet import importing_tensorflow

        with importing_tensorflow():
            from charrnn.generate import Generator
            from charrnn.model import load_model_dir

        self.model, self.vocabulary = load_model_dir(Path(context.artifacts[MODEL_DIR_ARTIFACT]))
        self.generator = Generator(self.model, self.vocabulary)

    def predict(self, context, model_input, params=None):
        options = {**DEFAULTS, **(params or {})}
        sampling = SamplingOptions(int(options["length"]), float(options["temperature"]), int(options["top_k"]),
                                   1, int(options["seed"]))
        return [self.generator.generate(prime, sampling)[0] for prime in primes_of(model_input)]


mlflow.models.set_model(TextGenerator())
