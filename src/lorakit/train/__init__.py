"""Training: a Trainer emitting typed events, metrics, checkpoints, artifacts, dashboard and plain logs.

Examples:
    >>> from lorakit.train import Trainer, TrainConfig, accuracy
    >>> TrainConfig(epochs=1).epochs
    1
"""

from .artifacts import export_adapter
from .config import TrainConfig
from .events import CheckpointSaved, EpochEnded, Event, RunEnded, RunStarted, StepLogged
from .metrics import Metric, accuracy, perplexity
from .reporting import PlainLog, auto_reporter
from .trainer import Trainer, TrainResult

__all__ = [
    "CheckpointSaved",
    "EpochEnded",
    "Event",
    "Metric",
    "PlainLog",
    "RunEnded",
    "RunStarted",
    "StepLogged",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "accuracy",
    "auto_reporter",
    "export_adapter",
    "perplexity",
]
