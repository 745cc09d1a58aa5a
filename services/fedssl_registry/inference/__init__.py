"""Serving: loaded models (bounded cache), dynamic batching, Open Inference Protocol v2."""
