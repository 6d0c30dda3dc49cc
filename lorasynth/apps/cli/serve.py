"""``serve``: the local web app and HTTP API (FastAPI on uvicorn), models loaded once and kept warm."""

from __future__ import annotations

import errno
import socket

from lorasynth.core.numbers import float_arg, int_arg
from lorasynth.errors import LorasynthError
from lorasynth.apps.cli.helpfmt import examples


def register(sub) -> None:
    p = sub.add_parser("serve", help="local web app + HTTP API: photo -> LoRA, blend, preview, library",
                       description="Serve the local web app and its HTTP API (OpenAPI docs at /docs, offline): "
                                   "photo -> LoRA download, blends, previews with --base, the library with "
                                   "--library. Models stay loaded between requests; nothing is downloaded.",
                       epilog=examples("lorasynth serve --model ~/.cache/lorasynth/demo/MODEL --base BASE --library LIB",
                                       "lorasynth serve --model M --base /models/sd15 --library lib --port 7861"))
    p.add_argument("--model", required=True, help="lorasynth model folder (from `lorasynth train`)")
    p.add_argument("--base", default=None, help="SD1.5 base model folder: enables previews")
    p.add_argument("--library", default=None, help="LoRA library folder: enables listing and library blends")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_arg(0, 65535), default=7860, help="port to listen on (0: any free port)")
    p.add_argument("--model-root", default=None, help="folder of face-model files (ArcFace); never downloaded")
    p.add_argument("--max-upload-mb", type=float_arg(above=0, maximum=10_000), default=20.0,
                   help="largest request body (MB)")
    p.add_argument("--queue", type=int_arg(0, 1000), default=4, help="generation jobs allowed to wait (more: HTTP 429)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="another web origin (e.g. http://localhost:3000) whose pages may send changes to this server "
                        "(repeatable); by default only the server's own page may")
    p.add_argument("--workers", type=int_arg(1, 64), default=2,
                   help="threads for CPU work (decoding, faces, synthesis, blends); more requests wait, then get 503")
    p.add_argument("--results-mb", type=float_arg(above=0, maximum=1_000_000), default=1000.0,
                   help="memory kept for synthesized and blended LoRAs (MB); the oldest are dropped")
    p.add_argument("--header-timeout", type=float_arg(above=0, maximum=3600), default=10.0,
                   help="seconds a client has to send a request's headers")
    p.add_argument("--body-timeout", type=float_arg(above=0, maximum=3600), default=120.0,
                   help="seconds a client has to send a request's body (an upload)")
    p.add_argument("--threads", type=int_arg(1, 1024), default=None,
                   help="torch threads per operation (default: torch's choice); 1 serves concurrent synthesis "
                        "requests faster when the cores are busy")
    p.add_argument("--lazy", action="store_true", help="load the models on first use instead of at start (faster start)")
    p.set_defaults(func=cmd_serve)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or one clear LorasynthError (port in use, bad address)."""
    if not 0 <= port <= 65535:
        raise LorasynthError(f"--port must be 0..65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise LorasynthError(f"cannot bind to host {host!r}: {e.strerror}") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop; not a 2nd listener
    try:
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LorasynthError(f"port {port} on {host} is already in use (another `lorasynth serve`?); "
                                 f"stop it or choose another --port") from None
        raise LorasynthError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def offline() -> None:
    """The server never downloads: hub ids resolve from the local cache only."""
    import os
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:  # read at import time: patch the live value too
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True


def uvicorn_config(app, cfg):
    """uvicorn's settings for ``app``: the header timeout, idle keep-alive, open-connection cap."""
    import uvicorn

    from lorasynth.apps.server.protocol import header_timeout_protocol

    return uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=5,
                          http=header_timeout_protocol(cfg.header_timeout), limit_concurrency=cfg.max_connections)


def cmd_serve(args) -> int:
    import uvicorn

    from lorasynth.apps.server import ServerConfig, create_app
    from lorasynth.apps.server.middleware import normalize_origin

    cfg = ServerConfig(model=args.model, base=args.base, library=args.library, host=args.host, port=args.port,
                       model_root=args.model_root, max_upload_bytes=int(args.max_upload_mb * 1e6), queue_size=args.queue,
                       warm_up=not args.lazy, allow_origins=tuple(normalize_origin(o) for o in args.allow_origin),
                       workers=args.workers, results_budget_bytes=int(args.results_mb * 1e6),
                       header_timeout=args.header_timeout, body_timeout=args.body_timeout)
    sock = bind_socket(args.host, args.port)  # before loading models: a busy port fails fast
    cfg.port = sock.getsockname()[1]
    offline()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        print(f"lorasynth serve: loading {args.model}" + (f" + base {args.base}" if args.base else "") + " ...", flush=True)
        app = create_app(cfg)
        port = sock.getsockname()[1]
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"lorasynth serve: open http://{shown}:{port}/  (API docs: /docs; Ctrl-C stops)", flush=True)
        server = uvicorn.Server(uvicorn_config(app, cfg))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C
            pass
    finally:
        sock.close()
    print("lorasynth serve: stopped", flush=True)
    return 0
