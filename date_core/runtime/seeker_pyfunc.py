"""The registered seeker as an MLflow pyfunc, logged as code (MLflow's "models from code"):
MLflow keeps this file with each model version and runs it when the version is loaded, so no
Python object is cloud-pickled into the registry.

``predict`` takes a DataFrame with a ``query`` column (strings) and returns the query
embeddings ``[N, d]`` (float32); the checkpoint folder is the ``checkpoint`` artifact, which
``pipelines/evaluate.py`` and :func:`date_core.load_seeker` use directly."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

#: the artifact key of the checkpoint folder (also read by :mod:`date_core.runtime.tracking`)
CHECKPOINT_KEY = "checkpoint"


class SeekerModel(mlflow.pyfunc.PythonModel):
    """Query embeddings of the seeker in the ``checkpoint`` artifact."""

    def load_context(self, context) -> None:
        from date_core.inference import load_seeker

        self.seeker = load_seeker(context.artifacts[CHECKPOINT_KEY])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        return np.asarray(self.seeker.encode_queries(list(model_input["query"])), dtype=np.float32)


mlflow.models.set_model(SeekerModel())
