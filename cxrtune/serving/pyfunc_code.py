"""The code MLflow runs to load a cxrtune model ("models from code": nothing is pickled).

MLflow copies this file into the logged model and executes it at load time; the model's
weights and spec come from its artifacts (``CXRClassifier.load_context``). Only MLflow
runs this file: importing it elsewhere would register a model with MLflow's loader.
"""

from mlflow.models import set_model

from cxrtune.serving.model import CXRClassifier

set_model(CXRClassifier())
