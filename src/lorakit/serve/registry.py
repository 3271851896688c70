"""The adapters a server knows, which of them are loaded, and who is using them.

    registry = Registry(load=..., unload=..., root="/srv/adapters", max_loaded=8)
    registry.add("sql", "/srv/adapters/sql")       # known and loaded (evicting the least recently used idle one)
    registry.acquire("sql"); ...; registry.release("sql")   # around every request that uses it
    await registry.hold("sql", "chat")             # a composition's adapters: all loaded at once, or wait
    registry.remove("sql")                         # unloaded now, or when its last request finishes

A known adapter stays known after `--max-loaded` evicts it: its next request loads it again (vLLM keeps such
adapters in a CPU cache; here the directory is the cache). When every loaded adapter is in use, `hold` waits (on
the event loop, holding no thread) until one is released, as vLLM's scheduler keeps a request for an adapter
beyond --max-loras waiting; at most `max_waiting` requests wait so, more are refused with 429.
`remove` forgets an adapter; one in use by requests is unloaded when the last of them releases it (deferred),
so no request ever loses its adapter mid-generation.
The `load`/`unload` callbacks do the model work (on the engine thread, for a decoder); this class only keeps
the books, under one lock, and never calls them while holding it for anything but the decision.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path


class RegistryError(Exception):
    """A refused registry operation; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AllBusy(RegistryError):
    """Every loaded adapter is in use and `max_loaded` are loaded: a new one must wait for a release."""


def _settle(future: asyncio.Future[None]) -> None:
    """Resolve a waiter's future unless it is done (e.g. cancelled: its client left)."""
    if not future.done():
        future.set_result(None)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    """Tell waiting requests (on their event loops, from any thread) that an adapter slot may have freed."""
    for future in waiters:
        loop = future.get_loop()
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle, future)


def check_path(root: str | Path | None, given: str) -> Path:
    """The adapter directory `given` (absolute, or relative to `root`), refused unless it lies under `root`.

    `..` is refused as written; symlinks are resolved before the check, so a link out of `root` is refused too,
    and so is a directory under `root` holding a file (or folder) that is a link leading out of it: a load
    opens the files of the directory, so each of them must resolve under `root` as well.

    Examples:
        >>> check_path("/srv/adapters", "../etc")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lorakit.serve.registry.RegistryError: lora_path '../etc': '..' is not allowed; give a path under the ...
    """
    if root is None:
        raise RegistryError(
            400,
            "loading adapters at run time needs the server started with an adapter root (adapter_root)",
        )
    path = Path(given)
    if ".." in path.parts:
        raise RegistryError(400, f"lora_path {given!r}: '..' is not allowed; give a path under the adapter root")
    base = Path(root).resolve()
    try:
        full = (path if path.is_absolute() else base / path).resolve()
        if not full.is_relative_to(base):
            raise RegistryError(400, f"lora_path {given!r} resolves to {full}, outside the adapter root {base}")
        if not full.is_dir():
            raise RegistryError(400, f"lora_path {given!r}: no such adapter directory under the adapter root {base}")
        for entry in sorted(full.iterdir()):
            target = entry.resolve()
            if not target.is_relative_to(base):
                raise RegistryError(
                    400,
                    f"lora_path {given!r}: {entry.name} is a link to {target}, outside the adapter root {base}; "
                    "every file an adapter load reads must lie under the root",
                )
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a loop of links
        raise RegistryError(400, f"lora_path {given!r}: not a usable path ({e})") from None
    return full


class Registry:
    """Known adapters (name -> directory), the loaded ones in least-recently-used order, and their users."""

    def __init__(
        self,
        load: Callable[[str, Path], None],
        unload: Callable[[str], None],
        *,
        root: str | Path | None = None,
        max_loaded: int | None = None,
        max_waiting: int = 0,
    ) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded} is invalid: expected >= 1")
        if max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting} is invalid: expected >= 0")
        self._load, self._unload = load, unload
        self.root, self.max_loaded, self.max_waiting = root, max_loaded, max_waiting
        self._lock = threading.Lock()
        self._known: dict[str, Path] = {}
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._users: dict[str, int] = {}
        self._loading: dict[str, threading.Event] = {}
        self._removed: set[str] = set()  # forgotten, unloaded when their last user releases them
        self._freed = 0  # how many times a slot may have freed (a loaded adapter went idle, a load failed, ...)
        self._waiters: list[asyncio.Future[None]] = []  # requests waiting in `hold` for a slot

    @property
    def waiting(self) -> int:
        """Requests waiting in `hold` for an adapter slot."""
        with self._lock:
            return len(self._waiters)

    async def hold(self, *names: str) -> None:
        """`acquire_all`, waiting while every loaded adapter is in use (RegistryError 429 when max_waiting already
        wait). Holds nothing while it waits, so requests for overlapping sets of adapters never deadlock.

        Waits on the running event loop, not in a thread, so waiting requests never starve the worker threads.
        """
        while True:
            with self._lock:
                seen = self._freed
            try:
                await asyncio.to_thread(self.acquire_all, names)
                return
            except AllBusy as e:
                busy = e
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            with self._lock:
                if self._freed != seen:
                    continue  # a slot freed while we tried: try again
                if len(self._waiters) >= self.max_waiting:
                    raise RegistryError(429, f"{busy}; {len(self._waiters)} requests already wait for one")
                self._waiters.append(future)
            try:
                await future
            finally:
                with self._lock:
                    if future in self._waiters:
                        self._waiters.remove(future)

    def _freed_slot(self) -> list[asyncio.Future[None]]:
        """Under the lock: note that a slot may have freed; the waiters to wake (outside the lock)."""
        self._freed += 1
        return list(self._waiters)

    def names(self) -> list[str]:
        """The adapters requests can name, in the order they were added."""
        with self._lock:
            return list(self._known)

    def known(self) -> list[tuple[str, Path]]:
        """(name, directory) of every adapter requests can name, in the order they were added."""
        with self._lock:
            return list(self._known.items())

    def path(self, name: str) -> Path:
        """The directory of a known adapter."""
        with self._lock:
            return self._known[name]

    def loaded(self) -> list[str]:
        """The loaded adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def users(self, name: str) -> int:
        """How many requests hold `name` now."""
        with self._lock:
            return self._users.get(name, 0)

    def add(self, name: str, path: Path) -> None:
        """Know and load a new adapter; RegistryError 400 if the name is taken, the load's own error if it fails."""
        with self._lock:
            if name in self._known or name in self._removed:
                what = "being unloaded" if name in self._removed else "already loaded"
                raise RegistryError(400, f"an adapter named {name!r} is {what}; unload it first or pick another name")
            self._known[name] = path
        try:
            self._ensure_loaded(name, path)
        except BaseException:
            with self._lock:
                self._known.pop(name, None)
            raise

    def acquire(self, name: str) -> None:
        """Hold `name` for one request: loaded (again, if it was evicted) and never unloaded until `release`."""
        with self._lock:
            if name not in self._known:
                raise RegistryError(404, f"no adapter named {name!r}")
            self._users[name] = self._users.get(name, 0) + 1
            path = self._known[name]
        try:
            self._ensure_loaded(name, path)
        except BaseException:
            self.release(name)
            raise

    def acquire_all(self, names: Sequence[str]) -> None:
        """`acquire` every one of `names` (one request's composition), or none of them: all loaded together.

        RegistryError 400 if they are more than `max_loaded`: they could never be loaded at once.
        """
        if self.max_loaded is not None and len(names) > self.max_loaded:
            raise RegistryError(
                400, f"{len(names)} adapters cannot be loaded at once: this server loads at most {self.max_loaded}"
            )
        held: list[str] = []
        try:
            for name in names:
                self.acquire(name)
                held.append(name)
        except BaseException:
            for name in held:
                self.release(name)
            raise

    def release(self, name: str) -> None:
        """A request using `name` has finished; a removed adapter is unloaded with its last user."""
        with self._lock:
            self._users[name] -= 1
            last = self._users[name] == 0
            if last:
                del self._users[name]
            drop = last and name in self._removed and name in self._loaded
            if drop:
                del self._loaded[name]
            if last:
                self._removed.discard(name)
            waiters = self._freed_slot() if last and name in self._loaded or drop else []
        if drop:
            self._unload(name)
        _wake(waiters)

    def remove(self, name: str) -> bool:
        """Forget `name`; unload it now (True) or, while requests use it, when the last one finishes (False)."""
        with self._lock:
            if name not in self._known:
                raise RegistryError(404, f"no adapter named {name!r} is loaded")
            del self._known[name]
            busy = self._users.get(name, 0) > 0
            if busy:
                self._removed.add(name)
                return False
            was_loaded = self._loaded.pop(name, "absent") is None
            waiters = self._freed_slot() if was_loaded else []
        if was_loaded:
            self._unload(name)
        _wake(waiters)
        return True

    def _ensure_loaded(self, name: str, path: Path) -> None:
        """Load `name` unless it is; evict least recently used idle adapters first to stay within max_loaded."""
        while True:
            with self._lock:
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                    return
                pending = self._loading.get(name)
                if pending is None:
                    victims = self._victims()
                    self._loading[name] = threading.Event()
                    break
            pending.wait()  # another request is loading it; then look again
        ok = False
        try:
            for victim in victims:
                self._unload(victim)
            self._load(name, path)
            ok = True
        finally:
            with self._lock:
                done = self._loading.pop(name)
                wanted = name in self._known or bool(self._users.get(name))
                if ok and wanted:
                    self._loaded[name] = None
                waiters = [] if ok and wanted else self._freed_slot()
            done.set()
            _wake(waiters)
        if ok and not wanted:  # removed while it loaded
            self._unload(name)

    def _victims(self) -> list[str]:
        """Idle loaded adapters to unload (taken off the books now) so that one more fits; under the lock."""
        if self.max_loaded is None:
            return []
        excess = len(self._loaded) + len(self._loading) + 1 - self.max_loaded
        idle = [n for n in self._loaded if not self._users.get(n)]
        if excess > len(idle):
            busy = len(self._loaded) - len(idle)
            raise AllBusy(
                429, f"all {busy} loaded adapters are in use (max_loaded={self.max_loaded}); try again shortly"
            )
        victims = idle[: max(excess, 0)]
        for v in victims:
            del self._loaded[v]
        return victims
