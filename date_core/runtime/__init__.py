"""Ray and MLflow glue: the only part of date_core that imports ray or mlflow."""
