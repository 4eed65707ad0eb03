"""Training package: folder of part photos -> Keras CNN -> calibrated, validated ONNX model + card.

Heavy imports (TensorFlow, Keras, tf2onnx) live in the modules that need them, so ``--help`` and
the pure helpers (splits, calibration, metrics) stay fast to import and to test.
"""
