"""benchmarks/serve.py's side by side: the same loads sent to `lorakit serve` and to llama.cpp's `llama-server`.

Each load is `clients` threads of the openai client (streaming), one request each, token-id prompts, greedy,
exactly `new` tokens (llama-server: `ignore_eos`; lorakit's served tokenizer has no end-of-sequence token), prompt
caching off on llama-server (every round sends the same prompts). The workloads: the base, one adapter, request i
on adapter i mod N, and request i on the composition 0.7·adapter(i) + 0.3·adapter(i+1) (llama-server's `lora`
field by id; lorakit's `adapters` field).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from lorakit.serve import RequestStats

LORAKIT, LLAMA = "lorakit serve", "llama-server"


class ClientLoad:
    """One workload on one server: request i is `prompt[i]` with `extra[i]` in its body, model `model[i]`."""

    def __init__(
        self, url: str, models: list[str], extras: list[dict[str, Any]], ids: list[list[int]], new: int
    ) -> None:
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
        self.models, self.extras, self.ids, self.new = models, extras, ids, new
        self.tokens = len(ids) * new
        self.rounds: list[list[RequestStats]] = []

    def one(self, i: int, out: list) -> None:
        t0 = time.perf_counter()
        stream = self.client.completions.create(
            model=self.models[i],
            prompt=self.ids[i],
            max_tokens=self.new,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=self.extras[i],
        )
        first = last = None
        chunks = used = 0
        for chunk in stream:
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
            if chunk.choices and (chunk.choices[0].text or chunk.choices[0].finish_reason is None):
                # a token whose text is held back (part of a character) still streams a chunk; a bare closing
                # chunk (only the finish reason) is no token
                last = time.perf_counter()
                first = first or last
                chunks += 1
        n = used or chunks
        assert n == self.new and first is not None and last is not None, (n, self.new)
        out[i] = RequestStats(self.models[i], len(self.ids[i]), n, "length", first - t0, (last - first) / (n - 1), None)

    def __call__(self) -> None:
        out: list = [None] * len(self.ids)
        threads = [threading.Thread(target=self.one, args=(i, out)) for i in range(len(self.ids))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s is not None for s in out), "an HTTP request failed (see above)"
        self.rounds.append(out)

    def greedy(self, i: int) -> str:
        """Request i's greedy text, not streamed (the sanity check of the two servers' outputs)."""
        r = self.client.completions.create(
            model=self.models[i], prompt=self.ids[i], max_tokens=self.new, temperature=0, extra_body=self.extras[i]
        )
        assert r.usage is not None and r.usage.completion_tokens == self.new, r.usage
        return r.choices[0].text


def composes(url: str) -> bool:
    """Whether this `lorakit serve` serves per-request compositions (it then lists llama.cpp's /lora-adapters)."""
    try:
        with urllib.request.urlopen(url + "/lora-adapters", timeout=30) as r:
            return isinstance(json.load(r), list)
    except urllib.error.HTTPError:
        return False


def workloads(names: list[str], clients: int) -> dict[str, list[tuple[str, float]]]:
    """Each workload's requests as (adapter index, weight) lists: [] is the base."""
    n = len(names)
    return {
        "base": [[] for _ in range(clients)],
        "1 adapter": [[(0, 1.0)] for _ in range(clients)],
        f"{n} adapters": [[(i % n, 1.0)] for i in range(clients)],
        f"{n} compositions": [[(i % n, 0.7), ((i + 1) % n, 0.3)] for i in range(clients)],
    }  # type: ignore[dict-item]


def lorakit_loads(url: str, names: list[str], ids: list[list[int]], new: int, compose: bool) -> dict[str, ClientLoad]:
    """The workloads on `lorakit serve`: one adapter at weight 1 by `model`, compositions by `adapters`."""
    loads = {}
    for name, reqs in workloads(names, len(ids)).items():
        if len(reqs[0]) > 1 and not compose:
            continue
        models, extras = [], []
        for req in reqs:
            if len(req) == 1:
                models.append(names[req[0][0]])
                extras.append({})
            else:
                models.append("model")
                extras.append({"adapters": [{"name": names[k], "weight": w} for k, w in req]})
        loads[name] = ClientLoad(url, models, extras, ids, new)
    return loads


def llama_loads(url: str, names: list[str], ids: list[list[int]], new: int) -> dict[str, ClientLoad]:
    """The workloads on llama-server: every adapter loaded at scale 0, a request's `lora` list sets its scales."""
    loads = {}
    for name, reqs in workloads(names, len(ids)).items():
        # the base as adapter 0 at scale 0, not an empty list: with `lora: []` this llama-server's slots answered
        # with neither the base's text nor its speed (a slot kept adapters of its previous request), and scale 0 on
        # every adapter is the base by definition, under the same graph as the other workloads
        extras = [
            {"ignore_eos": True, "cache_prompt": False, "lora": [{"id": k, "scale": w} for k, w in req or [(0, 0.0)]]}
            for req in reqs
        ]
        loads[name] = ClientLoad(url, ["model"] * len(ids), extras, ids, new)
    return loads


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def latencies(load: ClientLoad) -> tuple[float, float, float, float]:
    """TTFT p50, p95 and per-token p50, p95 over every request of every reported round."""
    stats = [x for rnd in load.rounds for x in rnd]
    ttft = [x.ttft for x in stats if x.ttft is not None]
    per = [x.per_token for x in stats if x.per_token is not None]
    return pct(ttft, 0.5), pct(ttft, 0.95), pct(per, 0.5), pct(per, 0.95)


def rate(times: list[float], tokens: int, r: int | None = None) -> float:
    return tokens / (statistics.median(times) if r is None else times[r])


def same_round(times: dict[str, list[float]], tokens: int, name: str, ref: str) -> float:
    """The median over rounds of the throughput ratio name/ref in the same round."""
    rounds = min(len(times[name]), len(times[ref]))
    return statistics.median(rate(times[name], tokens, r) / rate(times[ref], tokens, r) for r in range(rounds))


def common_prefix(x: str, y: str) -> int:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


class SideBySide:
    """Both servers started on the same model and adapters, and their loads keyed "server: workload"."""

    def __init__(self, a, base, tok, names: list[str], root, ids: list[list[int]]) -> None:
        from serve_servers import export_gguf, llama_server, llama_server_binary, lorakit_server

        binary = llama_server_binary(a.llama_server)
        model_dir = root / "model"  # the bare base (the engine's weights); its name is the base's model name
        base.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        self.servers = []
        lk_server, lk_url = lorakit_server(a, model_dir, names, root)
        self.servers.append(lk_server)
        self.compose = composes(lk_url)
        self.loads = {f"{LORAKIT}: {w}": x for w, x in lorakit_loads(lk_url, names, ids, a.new, self.compose).items()}
        self.llama = "llama-server: off"
        if binary is not None:
            t = time.perf_counter()
            gguf_base, gguf_adapters = export_gguf(model_dir, [root / n for n in names], root / "gguf")
            self.export_s = time.perf_counter() - t
            server, url = llama_server(a, binary, gguf_base, gguf_adapters)
            self.servers.append(server)
            self.llama = f"{binary.name} {server_version(binary)}"
            self.loads |= {f"{LLAMA}: {w}": x for w, x in llama_loads(url, names, ids, a.new).items()}
        self.workloads = list(workloads(names, len(ids)))

    def warm(self) -> dict[str, tuple[str, str]]:
        """One request of every load (the servers' first calls), request 0's greedy text on both servers."""
        texts: dict[str, dict[str, str]] = {}
        for key, load in self.loads.items():
            server, w = key.split(": ", 1)
            texts.setdefault(w, {})[server] = load.greedy(0)
        return {w: (t[LORAKIT], t[LLAMA]) for w, t in texts.items() if len(t) == 2}

    def close(self) -> None:
        for s in self.servers:
            s.close()


def server_version(binary) -> str:
    """llama-server's `--version` line (the llama.cpp build number and commit)."""
    import subprocess

    r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("version")]
    return lines[0] if lines else "(version unknown)"
