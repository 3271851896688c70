"""The live terminal dashboard (rich): progress with ETA, a loss chart, lr, throughput, parameters, memory,
and the latest evaluation (valid loss and metrics, the reference KL, its step).

It consumes trainer events and redraws about four times a second. It sizes itself to the terminal:
the chart takes the rows an 80×24 screen has left, and the panel stops growing past 120 columns.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..ui.chart import line_chart
from ..ui.fmt import fmt_duration
from .device import peak_memory_mib
from .events import CheckpointSaved, EpochEnded, Evaluated, Event, RunEnded, RunStarted, StepLogged

MAX_WIDTH = 120
TRAIN_STYLE, VALID_STYLE = "cyan", "magenta"


def _compiled(last: StepLogged | None) -> str:
    """` · compiled <s>, <n> recompiles` beside the device when the blocks are compiled."""
    if last is None or last.compile_s is None:
        return ""
    return f" · compiled {last.compile_s:.0f}s, {last.recompiles} recompiles"


class Dashboard:
    """A `rich.live.Live` view of a run; a trainer callback. `close()` restores the terminal."""

    main_rank_only = True  # under torchrun, only rank 0 draws

    def __init__(self, console: Console | None = None, title: str = "lorakit", transient: bool = False) -> None:
        self.console = console or Console()
        self.title, self.transient = title, transient  # transient: the view is erased when the run ends
        self.live: Live | None = None
        self.start: RunStarted | None = None
        self.last: StepLogged | None = None
        self.epoch: EpochEnded | None = None
        self.evaluated: Evaluated | None = None  # the latest evaluation, eval_every's or an epoch end's
        self.checkpoint: CheckpointSaved | None = None
        self.train_pts: list[tuple[float, float]] = []
        self.valid_pts: list[tuple[float, float]] = []
        self.done = False
        self.t0 = time.perf_counter()

    def __call__(self, e: Event) -> None:
        """Take one event; the view redraws on its own clock (and at once at start and end)."""
        if isinstance(e, RunStarted):
            self.start, self.t0 = e, time.perf_counter()
            self.live = Live(
                get_renderable=self.render, console=self.console, refresh_per_second=4, transient=self.transient
            )  # prints and warnings during the run appear above it
            self.live.start(refresh=True)
        elif isinstance(e, StepLogged):
            self.last = e
            self.train_pts.append((e.step, e.loss))
        elif isinstance(e, Evaluated):
            self._evaluated(e)
        elif isinstance(e, EpochEnded):
            self.epoch = e
            if e.valid_loss is not None or e.kl_ref is not None:
                args = (e.valid_loss, e.best_valid_loss, e.is_best, e.elapsed_s, e.valid_metrics, e.kl_ref)
                self._evaluated(Evaluated(e.epoch, e.step, *args))
            if not self.train_pts or self.train_pts[-1][0] != e.step:
                self.train_pts.append((e.step, e.train_loss))
        elif isinstance(e, CheckpointSaved):
            self.checkpoint = e
        elif isinstance(e, RunEnded):
            self.done = True
            self.close()

    def _evaluated(self, e: Evaluated) -> None:
        """Keep the latest evaluation and its point on the chart."""
        self.evaluated = e
        if e.valid_loss is not None:
            self.valid_pts.append((e.step, e.valid_loss))

    def close(self) -> None:
        """Draw the last frame and stop the live view (idempotent)."""
        if self.live is not None:
            self.live.refresh()
            self.live.stop()
            self.live = None

    # -- drawing ------------------------------------------------------------------------------------

    def _progress(self, s: RunStarted) -> tuple[int, float, int, float]:
        """(epoch, fraction of the epoch, step, fraction of the run) as of the last event."""
        step = max(self.last.step if self.last else s.start_step, self.epoch.step if self.epoch else 0)
        if self.epoch and (not self.last or self.epoch.step >= self.last.step):
            epoch, frac = self.epoch.epoch, 1.0
        elif self.last:
            epoch, frac = self.last.epoch, self.last.batch / max(self.last.batches_per_epoch, 1)
        else:
            epoch, frac = s.start_epoch, 0.0
        return epoch, frac, step, step / max(s.total_steps, 1)

    def _eta(self, s: RunStarted, step: int) -> str:
        """Time left at the mean rate of this process's steps so far."""
        done_here = step - s.start_step
        if self.done:
            return "done"
        if done_here <= 0:
            return "--:--"
        rate = (time.perf_counter() - self.t0) / done_here
        return fmt_duration(rate * (s.total_steps - step))

    def render(self) -> Panel | Text:
        """The whole dashboard as one renderable, sized to the console."""
        s = self.start
        if s is None:
            return Text("waiting for the run to start…")
        width = min(self.console.size.width, MAX_WIDTH)
        inner = width - 4  # panel borders and padding
        bars = self._bars(s)
        stats, extra = self._stats(s)
        legend = Text.assemble(("── train", TRAIN_STYLE), "  ", ("── valid", VALID_STYLE), style="")
        if self.evaluated:
            legend.append(f"   eval @ step {self.evaluated.step}", style="dim")
        if self.checkpoint:
            legend.append(f"   checkpoint @ step {self.checkpoint.step}", style="dim")
        used = 2 + 2 + 4 + (1 if extra else 0) + 1 + 1  # borders, bars, stats, legend, spacer
        # the metrics take what the terminal has beyond a 4-row chart (at least one line), the chart the rest
        metrics = self._metrics(inner, max(1, self.console.size.height - used - 3 - 4))
        used += len(metrics.plain.splitlines()) if metrics is not None else 0
        chart_h = max(4, min(16, self.console.size.height - used - 3))
        chart = line_chart(
            [("train", self.train_pts, TRAIN_STYLE), ("valid", self.valid_pts, VALID_STYLE)],
            width=inner,
            height=chart_h,
        )
        status = "done" if self.done else "training"
        return Panel(
            Group(bars, stats, *([metrics] if metrics is not None else []), legend, chart),
            title=f"{self.title} · {status}",
            title_align="left",
            width=width,
            border_style="green" if self.done else "blue",
            padding=(0, 1),
        )

    def _bars(self, s: RunStarted) -> Table:
        """The epoch and step progress bars, with the share of the epoch done and the ETA."""
        epoch, efrac, step, frac = self._progress(s)
        bars = Table.grid(padding=(0, 1), expand=True)
        bars.add_column(width=len(f"step {s.total_steps}/{s.total_steps}"), no_wrap=True)
        bars.add_column(ratio=1)
        bars.add_column(width=15, no_wrap=True, justify="right")
        bars.add_row(
            f"epoch {epoch}/{s.epochs}", ProgressBar(total=1.0, completed=efrac), f"{100 * efrac:3.0f}% of epoch"
        )
        bars.add_row(
            f"step {step}/{s.total_steps}",
            ProgressBar(total=1.0, completed=frac, complete_style="green"),
            f"ETA {self._eta(s, step)}",
        )
        return bars

    def _stats(self, s: RunStarted) -> tuple[Table, bool]:
        """The numbers in two columns of pairs, and whether they have a fifth row (kl_ref)."""
        stats = Table.grid(padding=(0, 2), expand=True)
        for _ in range(2):
            stats.add_column(style="dim", no_wrap=True)
            stats.add_column(no_wrap=True, ratio=1)
        last, ep, ev = self.last, self.epoch, self.evaluated
        train = f"{last.loss:.4g}" if last else (f"{ep.train_loss:.4g}" if ep else "—")
        valid = "—"
        if ev and ev.valid_loss is not None:
            valid = f"{ev.valid_loss:.4g} (best {ev.best_valid_loss:.4g})"
        mib, kind = peak_memory_mib(torch.device(s.device))
        pct = 100 * s.trainable_params / max(s.total_params, 1)
        throughput = f"{last.throughput:,.0f} {last.unit}/s" if last else "—"
        stats.add_row("train loss", Text(train, style=TRAIN_STYLE), "valid loss", Text(valid, style=VALID_STYLE))
        stats.add_row("lr", f"{last.lr:.2e}" if last else "—", "throughput", throughput)
        stats.add_row(
            "elapsed",
            fmt_duration(time.perf_counter() - self.t0),
            "CUDA peak" if kind == "cuda" else "peak RSS",
            _size(mib),
        )
        stats.add_row(
            "params",
            f"{s.trainable_params:,} / {s.total_params:,} ({pct:.1f}%)",
            "device",
            f"{s.device} · {s.precision}" + _compiled(last),
        )
        kl = ev.kl_ref if ev else None
        if kl is not None:  # a fifth row
            stats.add_row("", "", "kl_ref", f"{kl:.4g}")
        return stats, kl is not None

    def _metrics(self, width: int, rows: int) -> Text | None:
        """The latest step's metrics, then the latest evaluation's (`valid_` names), `name value` packed into at
        most `rows` lines of `width` (TRL's names such as rewards/chosen included); None when there are none."""
        items = [(k, v, "") for k, v in (self.last.metrics if self.last else {}).items()]
        items += [(f"valid_{k}", v, VALID_STYLE) for k, v in (self.evaluated.metrics if self.evaluated else {}).items()]
        if not items:
            return None
        text, used, lines = Text(no_wrap=True, overflow="crop"), 0, 1
        for name, value, style in items:
            shown = f"{name} {value:.4g}"
            if used and used + 2 + len(shown) > width:
                if lines == rows:
                    break
                text.append("\n")
                used, lines = 0, lines + 1
            elif used:
                text.append("  ")
                used += 2
            text.append(name + " ", style="dim")
            text.append(f"{value:.4g}", style=style)
            used += len(shown)
        return text


def _size(mib: float) -> str:
    """A memory size in at most 8 characters, so the stats row fits a 60-column terminal: `934 MiB`, `12.1 GiB`."""
    return f"{mib:.0f} MiB" if mib < 1000 else f"{mib / 1024:.1f} GiB"
