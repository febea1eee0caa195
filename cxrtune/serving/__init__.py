"""Serving the best model of a search: the MLflow pyfunc model that carries its
preprocessing (``model.py``, with the image inputs of ``images.py``) and `cxrtune
predict` (``predict.py``).

Nothing here is imported by the search's trials; the tracker imports ``model.py`` to log
the model.
"""
