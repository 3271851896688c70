"""`lorakit serve`: one local model and its adapters behind an OpenAI-compatible HTTP API (lorakit.serve).

Needs the `serve` extra (`pip install "lorakit[serve]"`: FastAPI, uvicorn, prometheus-client). Prints
"lorakit serve: ready on http://HOST:PORT" once it listens; SIGTERM (or Ctrl-C) drains the requests in
flight for up to --drain-timeout seconds, then it exits 0 (Ctrl-C: the dispatcher's interrupted status).

The API key comes from --api-key KEY, else --api-key-file FILE (its first line), else the LORAKIT_API_KEY
environment variable; --api-key and --api-key-file together are refused, and so is an empty key from any of
them (a server meant to need a key never starts without one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .adapter_specs import adapter_specs
from .common import (
    BadInput,
    add_base_mismatch_flag,
    add_model_flags,
    inputs,
    model_dir,
    positive_int,
    quiet_transformers,
)

KEY_VARIABLE = "LORAKIT_API_KEY"


def api_key(args: argparse.Namespace, environ: dict[str, str]) -> str | None:
    """The API key from --api-key, else --api-key-file, else LORAKIT_API_KEY; BadInput if one is given but empty.

    Examples:
        >>> api_key(argparse.Namespace(api_key=None, api_key_file=None), {"LORAKIT_API_KEY": "k1"})
        'k1'
        >>> api_key(argparse.Namespace(api_key=None, api_key_file=None), {"LORAKIT_API_KEY": ""})
        Traceback (most recent call last):
        ...
        lorakit.cli.common.BadInput: LORAKIT_API_KEY is set but empty: give it a key, or unset it to serve without one
    """
    if args.api_key is not None and args.api_key_file is not None:
        raise BadInput("--api-key and --api-key-file both give a key: give one of them")
    if args.api_key is not None:
        if not args.api_key.strip():
            raise BadInput("--api-key is empty: give a key, or leave the flag out to serve without one")
        return str(args.api_key)
    if args.api_key_file is not None:
        try:
            text = Path(args.api_key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"--api-key-file {args.api_key_file}: cannot read it ({e})") from None
        lines = text.splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise BadInput(f"--api-key-file {args.api_key_file}: the file is empty; its first line must be the key")
        return key
    if KEY_VARIABLE in environ:
        key = environ[KEY_VARIABLE].strip()
        if not key:
            raise BadInput(f"{KEY_VARIABLE} is set but empty: give it a key, or unset it to serve without one")
        return key
    return None


def serve(args: argparse.Namespace) -> int:
    """Run `lorakit serve`."""
    try:
        from ..serve import launch
        from ..serve.limits import Limits
    except ImportError as e:
        raise BadInput(
            f"lorakit serve needs the serve extra ({e.name} is missing): pip install 'lorakit[serve]'"
        ) from None
    from ..ui.progress import Progress

    quiet_transformers()
    if args.max_queue < 0 or args.drain_timeout < 0:
        raise BadInput("--max-queue and --drain-timeout must be >= 0")
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        raise BadInput(f"--adapter-root {args.adapter_root}: no such directory")
    key = api_key(args, dict(os.environ))
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_prompt_tokens=args.max_prompt_tokens,
        max_stops=args.max_stops,
        max_stop_chars=args.max_stop_chars,
    )
    options = launch.ServeOptions(
        model=model_dir(args),
        adapters=tuple(adapter_specs(args.adapter or [])),
        host=args.host,
        port=args.port,
        api_key=key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_loaded=args.max_loaded,
        prefill_chunk=args.prefill_chunk,
        adapter_root=Path(args.adapter_root) if args.adapter_root else None,
        drain_timeout=args.drain_timeout,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        allow_base_mismatch=args.allow_base_mismatch,
        limits=limits,
        access_log=not args.no_access_log,
        log_format=args.log_format,
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
    add_model_flags(p)
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]DIR",
        help="an adapter to serve under NAME (default: its folder's name); repeatable",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every path but /health (visible in the process list: prefer "
        f"--api-key-file or {KEY_VARIABLE})",
    )
    p.add_argument("--api-key-file", metavar="FILE", help="as --api-key, with the key read from FILE's first line")
    _add_engine_args(p)
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
    _add_limit_args(p.add_argument_group("limits per request (over one: 413 or 400 naming the flag)"))
    p.add_argument(
        "--no-access-log", action="store_true", help="no access-log line per request (default: one on stdout)"
    )
    p.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="access-log lines as text or JSON objects"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--dtype", choices=list(hf.DTYPES), help="load the model's weights in this dtype")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model directory")
    add_base_mismatch_flag(p)
    p.set_defaults(run=serve)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags: how many requests decode together, wait, are loaded, and the prefill's chunk."""
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
        "--prefill-chunk",
        type=positive_int,
        default=512,
        metavar="N",
        help="prompt tokens prefilled per engine turn (default 512): a long prompt is prefilled in chunks between "
        "the running requests' decode steps instead of stalling them",
    )


def _add_limit_args(limits: argparse._ArgumentGroup) -> None:
    """serve's limits per request: body size, prompt characters and tokens, stop strings."""
    limits.add_argument(
        "--max-body-bytes", type=positive_int, default=8 * 2**20, help="request body size (default 8 MiB)"
    )
    limits.add_argument(
        "--max-prompt-chars",
        type=positive_int,
        default=1_000_000,
        help="characters of a request's prompts or messages (default 1000000)",
    )
    limits.add_argument(
        "--max-prompt-tokens", type=positive_int, help="tokens of one prompt (default: the model's context)"
    )
    limits.add_argument("--max-stops", type=positive_int, default=4, help="stop strings per request (default 4)")
    limits.add_argument(
        "--max-stop-chars", type=positive_int, default=256, help="characters of one stop string (default 256)"
    )
