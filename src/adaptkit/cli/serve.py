"""`adaptkit serve`: the HTTP service over one backbone and an adapter store (FastAPI in uvicorn).

    adaptkit serve --store adapters/ --adapter runs/demo/*/*.safetensors     # gemma3-270m, demo adapters
    adaptkit serve --backbone gemma3-270m --store adapters/ --max-resident 8 --api-key-file keys.txt

    adaptkit serve --ray --replicas 2 --adapters-per-replica 4 --store /shared/adapters   # Ray Serve
    adaptkit serve --ray --address auto --store s3://bucket/adapters ...     # on a cluster (ray start --head)

`--adapter FILE` copies adapter files into the store at start-up (checked like an upload, under the
name in their header); `--adapter DIR` converts a peft adapter directory (LoRA, AdaLoRA, prefix tuning:
adapter_config.json + adapter_model.safetensors) into one, under the directory's name. Connections,
request heads and bodies are bounded (--max-connections, --header-timeout-s, --body-timeout-s,
--min-body-rate, --keep-alive-s, --max-header-bytes).
Needs the `serve` extra: pip install 'adaptkit[serve]' (with --ray: 'adaptkit[ray]').
With --ray the same HTTP API runs as a Ray Serve application: replicas of the backbone, each holding
at most --adapters-per-replica adapters, requests sent to a replica that holds theirs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from adaptkit.cli import main as adaptkit_main
from adaptkit.cli.flags import add_dataclass_flags, given
from adaptkit.core.bank import load
from adaptkit.core.errors import AdapterError
from adaptkit.core.quantize import HELP as QUANTIZE_HELP
from adaptkit.core.quantize import SCHEMES
from adaptkit.serving.catalog import AdapterCatalog
from adaptkit.serving.ray.options import RayOptions
from adaptkit.serving.settings import ServeSettings, load_api_keys
from adaptkit.serving.sharedstore import is_remote


def serve_command(args: argparse.Namespace) -> int:
    if args.ray:
        return serve_on_ray(args)
    try:
        from adaptkit.serving.app import create_app
        from adaptkit.serving.openai_routes import base_model_id
        from adaptkit.serving.server import check_limits, configure_server
    except ModuleNotFoundError as error:
        print(f"error: {error.name} is missing; install the service's dependencies: pip install 'adaptkit[serve]'",
              file=sys.stderr)
        return 2
    try:
        keys = load_api_keys(args.api_key_file) if args.api_key_file else ()
        settings = ServeSettings(**given(args, ServeSettings))
        check_limits(settings)  # before the backbone loads: a bad flag fails in a second, not a minute
        model = load(args.backbone, store=args.store, max_resident=args.max_resident, dtype=args.dtype,
                     device=args.device, quantize=args.quantize)
        catalog = AdapterCatalog(model.store)
        for path in args.adapter or ():
            # a directory is a peft adapter (as vLLM and LoRAX take them), converted and checked like an upload
            entry = (catalog.install_peft_dir(model, path, replace=True) if Path(path).is_dir() else
                     catalog.add_file(model, Path(path), replace=True))
            print(f"adapter {entry.name!r} ({entry.info['method']}) from {path} → {model.store.root}", file=sys.stderr)
    except (AdapterError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without --api-key-file: anyone who reaches it can use it and "
              "upload or delete adapters", file=sys.stderr)
    app = create_app(model, settings=settings, api_keys=keys)
    print(f"OpenAI-compatible API: base_url=http://{_url_host(args.host)}:{args.port}/v1 (model = an adapter's name, "
          f"or {base_model_id(model)!r} for the backbone)", file=sys.stderr, flush=True)
    # uvicorn with the connection, header, body and keep-alive limits (serving/server.py)
    configure_server(app, settings, host=args.host, port=args.port, log_level=args.log_level).run()
    return 0


def _url_host(host: str) -> str:
    """The host as a client writes it in a URL: an IPv6 address in brackets, a wildcard as this machine."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def serve_on_ray(args: argparse.Namespace) -> int:
    """The service as a Ray Serve application, on a Ray instance started here or on the cluster at --address;
    it runs until Ctrl-C / SIGTERM, then the application is deleted (and a Ray instance started here stops)."""
    try:
        import ray
        from ray import serve

        from adaptkit.serving.ray.deployment import build_app
    except ModuleNotFoundError as error:
        print(f"error: {error.name} is missing; install Ray Serve: pip install 'adaptkit[ray]'", file=sys.stderr)
        return 2
    for flag, value in (("--adapter", args.adapter), ("--max-resident", args.max_resident)):
        if value:
            print(f"error: {flag} does not apply with --ray: " + ("copy the files into the store, which every "
                  "replica reads" if flag == "--adapter" else "use --adapters-per-replica"), file=sys.stderr)
            return 2
    try:
        keys = load_api_keys(args.api_key_file) if args.api_key_file else ()
        settings = ServeSettings(**given(args, ServeSettings))
        options = RayOptions(**given(args, RayOptions))
    except (AdapterError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Replicas run in other working directories (other machines, even): paths must be absolute.
    store = args.store if is_remote(args.store) else str(Path(args.store).resolve())
    backbone = str(Path(args.backbone).resolve()) if Path(args.backbone).exists() else args.backbone
    started_here = args.address is None
    ray.init(address=args.address, num_cpus=args.ray_num_cpus if started_here else None,
             include_dashboard=False if started_here else None, logging_level=args.log_level.upper(),
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(backbone, store, options=options, settings=settings, api_keys=keys, dtype=args.dtype,
                            device=args.device), name="adaptkit", route_prefix="/",
                  logging_config={"log_level": args.log_level.upper()})
        print(f"serving on http://{args.host}:{args.port} (Ray Serve: {options.replicas} replicas, at most "
              f"{options.adapters_per_replica} adapters each; store {store})", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if started_here:
            serve.shutdown()
        else:  # a shared cluster: take only this application away
            serve.delete("adaptkit")
        ray.shutdown()
    return 0


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="HTTP service: translations from many adapters, batched together",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="gemma3-270m", help="zoo name, local dir or Hub id")
    parser.add_argument("--store", default="adapters", help="the adapter store directory (default: %(default)s)")
    parser.add_argument("--adapter", nargs="+", action="extend", metavar="PATH",
                        help="adapter files to copy into the store at start-up, under the names in their headers; "
                             "a peft adapter directory is converted, under the directory's name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-resident", type=int, default=None,
                        help="adapters kept in memory at most; others are loaded from the store when asked for")
    parser.add_argument("--api-key-file", help="one key per line; then every route but /healthz needs "
                                               "'Authorization: Bearer <key>'")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    parser.add_argument("--quantize", choices=SCHEMES, default=None, help=QUANTIZE_HELP)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    limits = parser.add_argument_group("batching and limits")
    add_dataclass_flags(limits, ServeSettings)
    on_ray = parser.add_argument_group("Ray Serve (--ray)")
    on_ray.add_argument("--ray", action="store_true", help="run as a Ray Serve application: replicas of the "
                        "backbone, adapters multiplexed across them (needs 'adaptkit[ray]')")
    on_ray.add_argument("--address", default=None, help="the Ray cluster to deploy on ('auto', or the address "
                        "`ray start --head` printed); default: start a Ray instance here")
    on_ray.add_argument("--ray-num-cpus", type=float, default=None,
                        help="CPUs of the Ray instance started here (default: all of this machine's)")
    add_dataclass_flags(on_ray, RayOptions)
    parser.set_defaults(func=serve_command)


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.serve ...` = `adaptkit serve ...`."""
    return adaptkit_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
