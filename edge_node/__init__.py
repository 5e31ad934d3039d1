"""The edge node (ONNX Runtime, never torch/transformers/ray): split mode over gRPC, health, local fallback, planner, CLI."""
