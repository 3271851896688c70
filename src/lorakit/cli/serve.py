"""`lorakit serve`: one local model and its adapters behind an OpenAI-compatible HTTP API (lorakit.serve).

Needs the `serve` extra (`pip install "lorakit[serve]"`: FastAPI, uvicorn, prometheus-client). Prints
"lorakit serve: ready on http://HOST:PORT" once it listens; SIGTERM (or Ctrl-C) drains the requests in
flight for up to --drain-timeout seconds, then it exits 0 (Ctrl-C: the dispatcher's interrupted status).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .adapter_commands import _adapter_specs
from .common import BadInput, add_base_mismatch_flag, inputs, positive_int, quiet_transformers


def serve(args: argparse.Namespace) -> int:
    """Run `lorakit serve`."""
    try:
        from ..serve import launch
    except ImportError as e:
        raise BadInput(
            f"lorakit serve needs the serve extra ({e.name} is missing): pip install 'lorakit[serve]'"
        ) from None
    from ..train.progress import Progress

    quiet_transformers()
    if args.max_queue < 0 or args.drain_timeout < 0:
        raise BadInput("--max-queue and --drain-timeout must be >= 0")
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        raise BadInput(f"--adapter-root {args.adapter_root}: no such directory")
    options = launch.ServeOptions(
        model=Path(args.model),
        adapters=tuple(_adapter_specs(args.adapter or [])),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_loaded=args.max_loaded,
        adapter_root=Path(args.adapter_root) if args.adapter_root else None,
        drain_timeout=args.drain_timeout,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        allow_base_mismatch=args.allow_base_mismatch,
    )
    app = inputs(launch.create_app, options, Progress())

    def ready(url: str) -> None:
        print(f"lorakit serve: ready on {url}", flush=True)

    launch.run(app, options, on_ready=ready)
    print("lorakit serve: stopped", file=sys.stderr, flush=True)
    return 0


def add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit serve`."""
    from ..hf import models as hf

    p = subparsers.add_parser(
        "serve",
        help="serve a model and its adapters over an OpenAI-compatible HTTP API",
        description="Serve a local Hugging Face model and many adapters of it: OpenAI's /v1/completions, "
        "/v1/chat/completions (causal LMs, continuously batched across adapters), /v1/embeddings and /classify "
        "(encoders), vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, /metrics and /health. "
        'A request\'s "model" names an adapter, or the base (its directory\'s name, or "base").',
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the base model directory (local Hugging Face format)")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]DIR",
        help="an adapter to serve under NAME (default: its folder's name); repeatable",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every path but /health")
    p.add_argument("--max-batch", type=positive_int, default=16, help="requests decoded together (default 16)")
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting beyond the batch before 429 (default 256)"
    )
    p.add_argument(
        "--max-loaded",
        type=positive_int,
        help="adapters loaded at once; the least recently used idle one is unloaded (and reloaded when asked for)",
    )
    p.add_argument(
        "--adapter-root",
        metavar="DIR",
        help="allow /v1/load_lora_adapter, for adapter directories under DIR only",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let requests in flight finish (default 30)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--dtype", choices=list(hf.DTYPES), help="load the model's weights in this dtype")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    add_base_mismatch_flag(p)
    p.set_defaults(run=serve)
