"""A trainer callback logging a run to MLflow (`pip install 'lorakit[track]'`: mlflow-skinny is enough).

The metrics are scalars.py's (train/loss, train/lr, train/grad_norm, valid/..., epoch/train_loss) at the optimizer
step; the parameters are the run's size, device and precision (scalars.run_params) and the `params` given (the
CLI passes every flag). Where to: `MLFLOW_TRACKING_URI` when set (a server, a database), else a local file store
in `<artifact_dir>/mlruns/` (MLflow 3 keeps that store in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE`, which
is set for it; read it with `MlflowClient("file://...")` or `mlflow ui --backend-store-uri ...`). Each start, a
resume too, is a new MLflow run tagged with the step it starts at.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .events import Event, RunEnded, RunStarted
from .scalars import event_scalars, run_params

SUBDIR = "mlruns"
EXPERIMENT = "lorakit"
MAX_PARAM = 6000  # MLflow's longest parameter value
NOT_IN_KEY = re.compile(r"[^\w\-. /]")  # what MLflow refuses in a metric's name (a regex metric has `:^$`...)


def _client_class() -> Any:
    """mlflow's MlflowClient class, or an ImportError saying how to install it."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ImportError("MLflow logging needs mlflow: pip install 'lorakit[track]' (or mlflow-skinny)") from e
    return MlflowClient


class MLflow:
    """Logs a run's metrics and parameters to MLflow; under torchrun, on rank 0 only.

    Args:
        params: the run's settings to record as MLflow parameters (None values are left out).
        tracking_uri: where to log (None: `MLFLOW_TRACKING_URI`, else `<artifact_dir>/mlruns/`).
        experiment: the MLflow experiment's name (made when missing).
        run_name: the MLflow run's name (None: the artifact dir's parent, the run's OUT).

    Examples:
        >>> callback = MLflow({"rank": 8})  # Trainer(..., callbacks=[PlainLog(), callback], artifact_dir="runs/a")
        >>> callback.run_id is None  # made when the run starts
        True
    """

    main_rank_only = True

    def __init__(
        self,
        params: Mapping[str, object] | None = None,
        tracking_uri: str | None = None,
        experiment: str = EXPERIMENT,
        run_name: str | None = None,
    ) -> None:
        self.client_class = _client_class()  # fail now, before training, if mlflow is missing
        self.params = {k: v for k, v in (params or {}).items() if v is not None}
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.client: Any = None
        self.run_id: str | None = None

    def __call__(self, e: Event) -> None:
        """Log the metrics of one event."""
        if isinstance(e, RunStarted):
            self._open(e)
        elif self.run_id is None:
            return
        elif (scalars := event_scalars(e)) is not None:
            step, values = scalars
            for tag, value in values.items():
                self.client.log_metric(self.run_id, metric_key(tag), value, step=step)
        elif isinstance(e, RunEnded):
            self.close()

    def _open(self, e: RunStarted) -> None:
        """Start the MLflow run and log its parameters."""
        from mlflow.entities import Param

        self.close()
        self.client = self.client_class(tracking_uri=self._uri(e))
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        name = self.run_name or (Path(e.artifact_dir).parent.name if e.artifact_dir else None)
        run = self.client.create_run(experiment_id, run_name=name, tags={"lorakit.start_step": str(e.start_step)})
        self.run_id = run.info.run_id
        params = self.params | run_params(e)
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:MAX_PARAM]) for k, v in params.items()])

    def _uri(self, e: RunStarted) -> str:
        """The tracking URI: the one given, MLFLOW_TRACKING_URI, or a file store under the artifact dir."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        if e.artifact_dir is None:
            raise ValueError("MLflow() needs a tracking_uri, or a Trainer with an artifact_dir to write into")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a file store
        return (Path(e.artifact_dir).resolve() / SUBDIR).as_uri()

    def close(self) -> None:
        """End the MLflow run (idempotent)."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None


def metric_key(tag: str) -> str:
    """`tag` as MLflow accepts a metric's name: characters it refuses become `_`.

    Examples:
        >>> metric_key("valid/regex:^[0-9]+$")
        'valid/regex___0-9___'
    """
    return NOT_IN_KEY.sub("_", tag)
