"""benchmarks/serve.py's in-process load generator (the HTTP one, against real servers, is serve_side.py's)."""

from __future__ import annotations

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
