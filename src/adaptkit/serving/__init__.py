"""The HTTP service: many adapters over one backbone, requests for different adapters batched together.

Layers inside: `settings` (limits and knobs), `catalog` (what the store holds, routing by language
pair), `work` (one batch → one `generate` call), `scheduler` (the bounded queue, the worker thread
that owns the model, the loader thread that brings adapters in), `metrics` (Prometheus), `app`
(FastAPI). FastAPI, uvicorn and prometheus-client are the `serve` extra: importing `adaptkit`
never needs them, only `adaptkit.serving.app` / `.metrics` do.
"""

from adaptkit.serving.settings import ServeSettings, load_api_keys

__all__ = ["ServeSettings", "load_api_keys"]
