"""Tools around the model: benchmarks, ONNX/TorchScript export, model stats (the demos are in
``convnextv2.demos``)."""
