"""fedssl model registry + inference service (FastAPI).

Registry API under /v1 (models, versions, aliases, federated runs), KServe Open Inference
Protocol v2 under /v2, Prometheus /metrics, and the web dashboard. Never imports Flower.
"""

__version__ = "0.1.0"
