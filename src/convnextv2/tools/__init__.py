"""Tools around the model: benchmarks, the built-in demo, ONNX/TorchScript export, model stats."""
