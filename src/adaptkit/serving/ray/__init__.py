"""The service on Ray Serve: one backbone per replica, adapters multiplexed across replicas by name.

    from ray import serve
    from adaptkit.serving.ray import RayOptions, build_app

    serve.run(build_app("gemma3-270m", "/shared/adapters", options=RayOptions(replicas=2, adapters_per_replica=4)),
              name="adaptkit", route_prefix="/")

or `adaptkit serve --ray --replicas 2 --adapters-per-replica 4`, or Ray's own CLI and config files:
`serve run adaptkit.serving.ray:app_builder backbone=gemma3-270m store=/shared/adapters replicas=2`.

Same HTTP API as `adaptkit serve` (uploads and deletes excepted: the store is changed where it lives),
plus GET /v1/replicas (each replica's loads, hits, resident adapters). The ingress (`ingress.py`)
routes rows to adapters and sends each adapter's rows to the replica deployment with
`multiplexed_model_id=<adapter>`; each replica (`replica.py`) holds at most K adapters (Ray's LRU,
mirrored in its bank) and batches rows of all of them in the single-process scheduler. Nothing but
the adapter store is shared between replicas. Needs the `ray` extra: pip install 'adaptkit[ray]'.
"""

from __future__ import annotations

from typing import Any

from adaptkit.serving.ray.options import RayOptions

__all__ = ["RayOptions", "app_builder", "build_app"]


def build_app(backbone: str, store: str, **kwargs: Any) -> Any:
    """The `ray.serve.Application` to pass to `serve.run`: see `deployment.build_app` for the keyword
    arguments (options: RayOptions, settings: ServeSettings, api_keys, dtype, device, quantize, cache)."""
    from adaptkit.serving.ray.deployment import build_app as build

    return build(backbone, store, **kwargs)


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run adaptkit.serving.ray:app_builder backbone=... store=... [replicas=N adapters_per_replica=K ...]`."""
    from adaptkit.serving.ray.deployment import app_builder as builder

    return builder(args)
