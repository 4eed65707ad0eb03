"""Defect-inspection inference service (FastAPI + onnxruntime).

Importing the package must stay cheap and free of TensorFlow: ``app.preprocessing`` is shared with
``training``, and the service itself lives in ``app.main``.
"""
