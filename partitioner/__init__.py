"""The partitioner (torch, offline): load a CLIP checkpoint, export the per-stage ONNX bundle, fit its codec calibration."""
