"""Run `lorakit` commands in one Python where the export runtimes (llama_cpp, onnxruntime) cannot be imported.

    python _without_runtimes.py '["export", "--model", ...]' '["export", ...]'

Each argument is one command's argv as a JSON list. `sys.modules[name] = None` is Python's own way to make
`import name` raise ImportError (and importlib.util.find_spec(name) answer None), as on a machine without it.
Before each command a `=== N` line goes to stdout and stderr, after it `=== exit CODE` to stdout.
"""

import json
import sys


def run(commands: list[str]) -> None:
    """Each command (a JSON argv) through lorakit's CLI, framed by `=== N` / `=== exit CODE` lines."""
    for name in ("llama_cpp", "onnxruntime"):
        sys.modules[name] = None  # type: ignore[assignment]

    from lorakit.cli import main

    for n, argv in enumerate(commands):
        print(f"=== {n}", flush=True)
        print(f"=== {n}", file=sys.stderr, flush=True)
        code = main(json.loads(argv))
        print(f"=== exit {code}", flush=True)


if __name__ == "__main__":  # pytest's doctest collection imports this file: only a child Python runs it
    run(sys.argv[1:])
