"""tl-models: fine-tune heads on frozen torchvision backbones, export to ONNX, prove parity, serve."""

__version__ = "0.12.0"
