"""The model as its users run it: ONNX (fp32, int8), TorchScript for WSInfer, a Triton/KServe
model repository, a model card and an offline bundle, all made from `models/best.pt`."""
