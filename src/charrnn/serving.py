"""The registered MLflow model: a prime in, generated text out, without this package's CLI.

Logged as an MLflow "model from code" (``served_model.py`` is the model's code; nothing is pickled)
with the trained model folder (``model.keras`` + ``vocabulary.json``) as its artifact, so

    mlflow.pyfunc.load_model("models:/charrnn/3").predict(["ROMEO: "], params={"length": 200})

and ``mlflow models serve -m models:/charrnn/3 --env-manager local`` (POST /invocations with
``{"inputs": ["ROMEO: "], "params": {"length": 200}}``) generate with the same compiled generator
as ``charrnn generate``.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from charrnn.sampling import SamplingOptions

MODEL_DIR_ARTIFACT = "model_dir"
# predict's params and their defaults (charrnn.sampling's; one text per prime, so no num_samples)
DEFAULTS = {name: getattr(SamplingOptions(), name) for name in ("length", "temperature", "top_k", "seed")}
PARAM_TYPES = {"length": "long", "temperature": "double", "top_k": "long", "seed": "long"}


def primes_of(model_input) -> list[str]:
    """The primes of a list of strings, a DataFrame's ``prime`` (or first) column, or a dict."""
    if hasattr(model_input, "columns"):
        column = "prime" if "prime" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column]]
    if isinstance(model_input, dict):
        return [str(v) for v in np.atleast_1d(model_input.get("prime", next(iter(model_input.values()))))]
    return [str(v) for v in np.atleast_1d(model_input)]


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # one prime per row: a list of strings, or a one-column frame
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(name, PARAM_TYPES[name], value) for name, value in DEFAULTS.items()]),
    )


def log_text_generator(model_dir: Path, registered_name: str | None, pip_requirements: list[str]):
    """Log the text generator (registering it under ``registered_name``); returns the ModelInfo."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("served_model.py")),
        artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
        signature=signature(),
        registered_model_name=registered_name,
        pip_requirements=pip_requirements,
    )


DOWNLOAD_PREFIX = "charrnn-model-"  # a temporary download of a logged model (removed after use)


@contextlib.contextmanager
def downloaded_model_dir(uri: str):
    """``models:/name/version`` or ``runs:/id/model`` -> a local model folder (model.keras + vocabulary),
    in a temporary folder removed when the block ends, on success or failure."""
    from charrnn.errors import UserError, first_line

    with tempfile.TemporaryDirectory(prefix=DOWNLOAD_PREFIX) as target:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=target))
        except Exception as err:  # MLflow raises its own exception types for a missing model or run
            first = first_line(err)
            raise UserError(f"cannot fetch {uri} from MLflow ({first[:200]}); check the name/version or run id "
                            "(`mlflow ui` lists them) and MLFLOW_TRACKING_URI") from None
        found = sorted(p.parent for p in local.rglob("model.keras") if (p.parent / "vocabulary.json").is_file())
        if not found:
            raise UserError(f"{uri} holds no charrnn model folder (model.keras + vocabulary.json); use the "
                            "`model` of a charrnn training run or a version of the registered model")
        yield found[0]

