"""splitclip: edge-cloud split inference for CLIP-style models (shared package: bundle, codec, runtime)."""
