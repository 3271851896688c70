"""Run `lorakit` commands in one Python where the export runtimes (llama_cpp, onnxruntime) cannot be imported.

    python _without_runtimes.py '["export", "--model", ...]' '["export", ...]'

Each argument is one command's argv as a JSON list. `sys.modules[name] = None` is Python's own way to make
`import name` raise ImportError (and importlib.util.find_spec(name) answer None), as on a machine without it.
Before each command a `=== N` line goes to stdout and stderr, after it `=== exit CODE` to stdout.
"""

import json
import sys

for name in ("llama_cpp", "onnxruntime"):
    sys.modules[name] = None  # type: ignore[assignment]

from lorakit.cli import main  # noqa: E402

for n, argv in enumerate(sys.argv[1:]):
    print(f"=== {n}", flush=True)
    print(f"=== {n}", file=sys.stderr, flush=True)
    code = main(json.loads(argv))
    print(f"=== exit {code}", flush=True)
