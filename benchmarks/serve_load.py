"""benchmarks/serve.py's load generators: in-process (Load) and over HTTP against a real server (HttpLoad)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from lorakit.serve import Engine, RequestStats, SamplingParams


class Load:
    """One configuration: its requests' adapters; each call serves them all and keeps every request's stats."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        ids: list[list[int]],
        adapters: list[str | None],
        sequential: bool = False,
    ) -> None:
        self.engine, self.params, self.ids, self.adapters, self.sequential = engine, params, ids, adapters, sequential
        self.rounds: list[list[RequestStats]] = []
        self.tokens = len(ids) * params.max_tokens

    def __call__(self) -> None:
        stats = []
        if self.sequential:
            for p, ad in zip(self.ids, self.adapters, strict=True):
                h = self.engine.submit(p, ad, self.params)
                h.result()
                stats.append(h.stats())
        else:
            handles = [self.engine.submit(p, ad, self.params) for p, ad in zip(self.ids, self.adapters, strict=True)]
            for h in handles:
                h.result()
            stats = [h.stats() for h in handles]
        assert all(s is not None and s.completion_tokens == self.params.max_tokens for s in stats)
        self.rounds.append(stats)  # type: ignore[arg-type]


class HttpLoad:
    """The 16-adapter load through a `lorakit serve` subprocess: one streaming openai client thread per request."""

    def __init__(
        self,
        a: argparse.Namespace,
        model: torch.nn.Module,
        tok,
        names: list[str],
        root: Path,
        ids: list[list[int]],
        adapters: list[str],
    ) -> None:
        import openai

        model_dir = root / "model"
        model.save_pretrained(model_dir)  # the bare base (same weights as the engine's); adapters from their dirs
        tok.save_pretrained(model_dir)
        flags = [f"--adapter={n}={root / n}" for n in names]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lorakit",
                "serve",
                "--model",
                str(model_dir),
                *flags,
                "--port",
                "0",
                f"--max-batch={a.clients}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "ready on " in line:
                url = line.split("ready on ", 1)[1].strip()
                break
        else:
            raise RuntimeError(f"lorakit serve exited {self.proc.wait()}:\n{self.proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        self.ids, self.adapters, self.new = ids, adapters, a.new
        self.tokens = len(ids) * a.new
        self.rounds: list[list[RequestStats]] = []

    def one(self, prompt: list[int], adapter: str, out: list, i: int) -> None:
        t0 = time.perf_counter()
        stream = self.client.completions.create(
            model=adapter,
            prompt=prompt,
            max_tokens=self.new,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        first = last = None
        n = 0
        for chunk in stream:
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                last = time.perf_counter()
                first = first or last
        assert n == self.new and first is not None and last is not None
        # text chunks: a token that decodes to nothing (a special id) sends no text, so count by usage
        out[i] = RequestStats(adapter, len(prompt), n, "length", first - t0, (last - first) / max(1, n - 1), None)

    def __call__(self) -> None:
        out: list = [None] * len(self.ids)
        threads = [
            threading.Thread(target=self.one, args=(p, ad, out, i))
            for i, (p, ad) in enumerate(zip(self.ids, self.adapters, strict=True))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s is not None for s in out), "an HTTP request failed (see above)"
        self.rounds.append(out)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


# -- the report ------------------------------------------------------------------------------------------
