"""``idcraft serve``: the HTTP API and web page (see :mod:`idcraft.serve` and docs/serve.md)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an HTTP API and a web page for generation (offline world by default)",
        description="Keep models loaded and answer generation requests over HTTP: POST /v1/images/generations "
        "(OpenAI shape plus idcraft's fields), POST /v1/references, GET /v1/models, /healthz, /metrics, and a "
        "web page at /. With no --config it serves the offline world bundled with idcraft (no download).",
    )
    p.add_argument(
        "--config", metavar="YAML", help="models to keep loaded and server limits (see docs/serve.md)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--device", default=None, help="offline world only: cpu, cuda, mps or auto")
    p.add_argument(
        "--store",
        metavar="STORE",
        help="where uploaded references and encoded identities are kept: memory (default), a folder path "
        "(kept across restarts) or redis://host:port/db (shared by replicas); overrides server.store",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="run as a Ray Serve application: replicas (one GPU each by default) behind one HTTP address; "
        "settings in the config's ray section (pip install 'idcraft[ray]')",
    )
    p.add_argument(
        "--replicas", type=int, metavar="N", help="with --ray: this many replicas (overrides ray.replicas)"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="load the config and models, print what would be served, and exit",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import logging

    from ..errors import IdcraftError
    from ..serve.catalog import build_catalog
    from ..serve.config import load_config
    from ..serve.requirements import require_server_packages

    if not 0 <= args.port <= 65535:
        raise IdcraftError(f"--port {args.port}: ports run from 0 to 65535 (0 = any free port).")
    require_server_packages()  # before any model loads: without the extra nothing could be served
    from ..serve.stores import open_stores

    config = load_config(args.config)
    if args.device is not None:
        from ..prechecks import check_device_available

        check_device_available(args.device)  # --device cuda on a machine without one: now, not after loading
        config.world.device = args.device
        if args.device == "cpu":
            config.ray.num_gpus = 0  # with --ray: replicas that ask for no GPU
    if args.store is not None:
        config.server.store = args.store
    if args.replicas is not None:
        if not args.ray:
            raise IdcraftError(
                "--replicas needs --ray (one process serves alone; see docs/serve-scaling.md)."
            )
        if args.replicas < 1:
            raise IdcraftError(f"--replicas {args.replicas}: a deployment needs at least 1 replica.")
        config.ray.replicas = args.replicas
        config.ray.autoscaling = None
    open_stores(config.server)  # a store that is not there is refused now, before the models load
    if args.ray and not args.check:
        from ..serve.ray_app import run as run_ray

        run_ray(config, host=args.host, port=args.port)
        return 0
    logging.getLogger("idcraft.serve").setLevel(logging.INFO)
    catalog = build_catalog(config)
    if args.check:
        from ..serve.service import Service

        print(json.dumps(Service(config, catalog).models(), indent=2))
        return 0
    from ..serve.server import serve

    print(f"idcraft serve: {', '.join(catalog.methods)} on http://{args.host}:{args.port}/", flush=True)
    try:
        serve(config, host=args.host, port=args.port, catalog=catalog)
    except OSError as exc:  # address in use, no permission for a low port, unknown host
        raise IdcraftError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}).") from exc
    return 0
