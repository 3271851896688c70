"""Helpers of the serve tests: a real `lorakit serve` subprocess, tiny models and adapters, reference generations.

`Server` starts `python -m lorakit serve ... --port 0` and waits for its "ready on URL" line (no sleeps); its
`stop()` sends SIGTERM and returns the exit code. Import after `sys.path.insert(0, <this directory>)`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

TESTS = Path(__file__).parent.parent
sys.path.insert(0, str(TESTS))
import _hf_models  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
CONTEXT = 1024  # the tiny llama's context, widened so that long streams outlast the events the tests wait for


class Server:
    """A `lorakit serve` subprocess on a free port of 127.0.0.1."""

    def __init__(self, *args: object, timeout: float = 120, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "lorakit", "serve", "--port", "0", *map(str, args)]
        env = {**ENV, **(env or {})}  # `env`: variables added to the offline environment (HF_HOME, ...)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._collect, daemon=True).start()
        self.url = self.wait_for("ready on ", timeout).split("ready on ", 1)[1].strip()
        self.base_url = self.url + "/v1"

    @staticmethod
    def _read(stream, out: queue.Queue) -> None:
        for line in stream:
            out.put(line)
        out.put(None)

    def _collect(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """The first stdout line holding `text`; AssertionError (with stderr) if the process ends first."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout}s; stderr:\n{''.join(self.stderr)}") from None
            if line is None:
                self.proc.wait()
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}; stderr:\n{''.join(self.stderr)}")
            if text in line:
                return line

    def client(self, **kwargs):
        """An openai client for this server (no retries: a test sees each answer)."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code."""
        if self.proc.poll() is None:
            self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, got = key.partition("{")
        got_labels = ",".join(sorted(got.rstrip("}").split(","))) if got else ""
        if sample == name and got_labels == want:
            return float(value)
    return 0.0


def tiny_chat_llama(directory: Path, context: int = CONTEXT) -> Path:
    """The tiny random llama of _hf_models with the ChatML template, its context set to `context` tokens."""
    _hf_models.save_tiny("llama", directory, chat_template=_hf_models.CHATML)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = context
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def make_adapter(
    model_dir: Path,
    out: Path,
    seed: int,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    target_parameters: tuple[str, ...] = (),
    use_dora: bool = False,
) -> Path:
    """A causal-lm LoRA adapter of `model_dir` with random (non-zero) A and B, saved as lorakit saves one
    (`target_parameters`: LoRA on those parameters too, e.g. "all-experts"; `use_dora`: a DoRA adapter, its
    magnitudes left as initialised)."""
    import lorakit as lk
    from lorakit.hf import models as hf

    model, _ = hf.load(model_dir, "causal-lm")
    if target_parameters:
        lk.apply_lora(
            model, lk.LoraConfig(rank=4, alpha=8), list(targets) or None, target_parameters=list(target_parameters)
        )
    else:
        lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8, use_dora=use_dora), list(targets))
    randomised = ("lora_A", "lora_B") if use_dora else ("lora_",)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in randomised):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lk.save_adapters(model, out)
    hf.write_task_file(out, "causal-lm", base_model=model_dir)
    return out


class Reference:
    """The same model in this process, adapters loaded by name: what one request alone generates greedily."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]) -> None:
        from lorakit.hf import chat
        from lorakit.hf import models as hf
        from lorakit.loading import load_adapters

        self.model, self.tok = hf.load(model_dir, "causal-lm")
        for name, path in adapters.items():
            load_adapters(self.model, path, name=name)
        self.model.eval()
        self.eos = [self.tok.eos_token_id]
        self.chat_stops = self.eos + [i for i in chat.end_of_turn_ids(self.tok) if i not in self.eos]

    def ids(self, prompt: str) -> list[int]:
        """A completion prompt's token ids, as the server encodes it."""
        return list(self.tok(prompt)["input_ids"])

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A chat's prompt ids, rendered as the server renders it."""
        from lorakit.hf import chat

        text = chat.render(self.tok, chat.parse_messages(messages, training=False), add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def greedy(self, adapter: str | None, ids: list[int], max_tokens: int, stops: list[int]) -> tuple[str, int, str]:
        """(text, completion tokens, finish_reason) of greedy generation from `ids` under `adapter` alone."""
        import lorakit as lk

        with torch.no_grad(), lk.use_adapter(self.model, adapter):
            out = self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=self.tok.pad_token_id,
            )
        new = out[0, len(ids) :].tolist()
        stopped = bool(new) and new[-1] in stops
        full = self.tok.decode(ids + new, skip_special_tokens=True)
        text = full[len(self.tok.decode(ids, skip_special_tokens=True)) :]
        return text, len(new), "stop" if stopped else "length"


def fuzz(server: Server, max_examples: int, models: list[str], timeout: float = 420) -> tuple[int, str]:
    """schemathesis against the server's own OpenAPI schema, every operation, checking that no answer is a 5xx
    and that every answer matches the schema: (the number of generated test cases, its output). Most bodies
    name one of `models` (tests/serve/_fuzz_hooks.py), so that their other fields reach the model."""
    import re

    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        server.url + "/openapi.json",
        "--checks",
        "not_a_server_error,response_schema_conformance",
        "--max-examples",
        str(max_examples),
        "--phases",
        "examples,coverage,fuzzing",
        "--workers",
        "1",
        "--request-timeout",
        "120",
        "--max-failures",
        "3",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "--suppress-health-check",
        "all",
    ]
    env = {
        **ENV,
        "SCHEMATHESIS_HOOKS": str(Path(__file__).parent / "_fuzz_hooks.py"),
        "LORAKIT_FUZZ_MODELS": ",".join(models),
    }
    try:
        with tempfile.TemporaryDirectory() as scratch:  # schemathesis keeps a cache in its working directory
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=scratch)
    except subprocess.TimeoutExpired as e:  # e.g. a request that never ends: show how far it got
        got = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout)
        raise AssertionError(f"schemathesis ran over {timeout}s:\n{got[-4000:]}") from None
    out = run.stdout + run.stderr
    found = re.search(r"(\d+) generated", out)
    assert run.returncode == 0 and found, out[-6000:]
    return int(found.group(1)), out
