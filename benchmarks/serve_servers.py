"""benchmarks/serve.py's two servers as real subprocesses: `lorakit serve` and llama.cpp's own `llama-server`.

Also what the llama.cpp side needs: the binary (built once by scripts/build_llama_server.sh into a cache), the
served model's tokenizer as a byte-level BPE over the model's whole vocabulary (llama.cpp reads only that kind
from a GGUF), and the base and its adapters exported by `lorakit export`'s library calls (f32 GGUF, proven in
llama.cpp) into files llama-server loads.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE.parent / "scripts" / "build_llama_server.sh"


def llama_server_binary(choice: str) -> Path | None:
    """The llama-server to run: None for "off", the given path, or ("auto") the cached build (built if absent)."""
    if choice == "off":
        return None
    if choice != "auto":
        path = Path(choice)
        if not os.access(path, os.X_OK):
            raise SystemExit(f"--llama-server {choice}: not an executable file")
        return path
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(BUILD)], env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    return Path(out.strip().splitlines()[-1])


def bpe_tokenizer(vocab: int):
    """A byte-level BPE tokenizer with exactly `vocab` ids (pad and bos special, no eos: nothing stops a request),
    trained on random lowercase words so that every id is a real token llama.cpp and transformers both read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = [
        " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(12))
        for _ in range(6000)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(words, trainer)
    if tok.get_vocab_size() != vocab:
        raise RuntimeError(f"the BPE tokenizer has {tok.get_vocab_size()} ids, the model {vocab}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>")


def export_gguf(model_dir: Path, adapter_dirs: list[Path], out: Path) -> tuple[Path, list[Path]]:
    """(base GGUF, one GGUF adapter per adapter dir), f32, written as `lorakit export --format gguf-adapter
    --dtype f32` writes them. The first is proven in llama.cpp (the base GGUF beside it, which llama-server
    serves, with it); the others are written by the same code unproven (`--no-proof`): a proof runs for minutes
    on a busy 2-core machine, and they differ from the first only in their numbers."""
    from lorakit.export import gguf, prepare

    adapters = []
    for i, adapter_dir in enumerate(adapter_dirs):
        dest = out / f"a{i}"
        model, tok, task = prepare.load_unmerged(model_dir, [adapter_dir])
        if i == 0:
            gguf.export_gguf(model, tok, task, model_dir, [adapter_dir], dest, dtype="f32", adapter_only=True)
        else:
            reason = "benchmarks/serve.py proves the first adapter only"
            gguf.export_gguf_unproven(
                model, tok, task, model_dir, [adapter_dir], dest, reason=reason, dtype="f32", adapter_only=True
            )
        files = sorted(dest.glob("*.gguf"), key=lambda p: p.stat().st_size)
        adapters.append(files[0])  # the adapter is the small one, the base beside it the large one
        for extra in files[1:] if i else []:
            extra.unlink()  # the same base again: keep the first (proven) copy
    base = max((out / "a0").glob("*.gguf"), key=lambda p: p.stat().st_size)
    return base, adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess: started, waited for until it prints `ready` (its output then drained in a thread,
    the last lines kept for errors), stopped by close()."""

    def __init__(self, cmd: list[str], ready: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line)
            if ready in line:
                self.line = line
                break
        else:
            raise RuntimeError(f"{cmd[0]} exited {self.proc.wait()}:\n{''.join(self.tail)}")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def lorakit_server(a: argparse.Namespace, model_dir: Path, names: list[str], root: Path) -> tuple[Server, str]:
    """`lorakit serve` on the saved base and adapters, a.threads torch threads; (server, base URL)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    flags = [f"--adapter={n}={root / n}" for n in names]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), *flags, "--port", "0"]
    cmd += ["--device", a.device]  # gpu.sh: the --device cuda path of the real server
    server = Server([*cmd, f"--max-batch={a.clients}"], "ready on ", env)
    return server, server.line.split("ready on ", 1)[1].strip()


def llama_server(a: argparse.Namespace, binary: Path, base: Path, adapters: list[Path]) -> tuple[Server, str]:
    """llama.cpp's llama-server: the base GGUF, every adapter loaded at scale 0 (`--lora-init-without-apply`, a
    request's `lora` field sets the scales), a.clients parallel slots with continuous batching, a.threads
    threads; (server, base URL)."""
    port = free_port()
    loras = [x for p in adapters for x in ("--lora", str(p))]
    ctx = a.clients * (a.prompt + a.new + 16)  # split evenly over the slots
    cmd = [str(binary), "-m", str(base), *loras, "--lora-init-without-apply", "-np", str(a.clients), "-cb"]
    cmd += ["-c", str(ctx), "-t", str(a.threads), "-tb", str(a.threads), "--host", "127.0.0.1", "--port", str(port)]
    server = Server(cmd, "listening on ", {**os.environ, "OMP_NUM_THREADS": str(a.threads)})  # model loaded
    return server, f"http://127.0.0.1:{port}"
