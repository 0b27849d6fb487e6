"""eclipse-export: ONNX/TensorRT export and a torch-free runtime for ECLIPSE + Kandinsky 2.2."""

__version__ = "0.1.0"
