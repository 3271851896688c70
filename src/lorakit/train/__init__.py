"""Training: a Trainer emitting typed events, metrics, checkpoints, artifacts, dashboard, plain logs, trackers
(TensorBoard, MLflow, Weights & Biases: each imports its library only when made), and a forgetting monitor (the
KL of the adapted model from its base on reference text).

Examples:
    >>> from lorakit.train import Trainer, TrainConfig, accuracy
    >>> TrainConfig(epochs=1).epochs
    1
"""

from .align_config import DPOConfig, GRPOConfig
from .artifacts import export_adapter
from .batch import BatchOut, Objective
from .config import TrainConfig
from .dpo import DPO_STATS, DPOLoss, DPOObjective, dpo_loss, dpo_metrics, reference_logps
from .events import CheckpointSaved, EpochEnded, Evaluated, Event, RunEnded, RunStarted, StepLogged
from .forgetting import ReferenceKL, reference_loader
from .grpo import GRPOObjective, group_advantages, grpo_loss, grpo_metrics
from .logps import token_logps
from .metrics import Metric, accuracy, perplexity
from .mlflow_log import MLflow
from .reporting import PlainLog, auto_reporter
from .tensorboard import TensorBoard
from .trainer import Trainer, TrainResult
from .wandb_log import WandB

__all__ = [
    "BatchOut",
    "CheckpointSaved",
    "DPOConfig",
    "DPOLoss",
    "DPOObjective",
    "DPO_STATS",
    "EpochEnded",
    "Evaluated",
    "GRPOConfig",
    "GRPOObjective",
    "Event",
    "MLflow",
    "Objective",
    "Metric",
    "PlainLog",
    "ReferenceKL",
    "RunEnded",
    "RunStarted",
    "StepLogged",
    "TensorBoard",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WandB",
    "accuracy",
    "auto_reporter",
    "dpo_loss",
    "dpo_metrics",
    "export_adapter",
    "group_advantages",
    "grpo_loss",
    "grpo_metrics",
    "perplexity",
    "reference_logps",
    "reference_loader",
    "token_logps",
]
