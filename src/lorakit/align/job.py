"""The preference and RL stages as jobs: `lorakit finetune --task dpo|grpo` after hf/finetune.prepare.

    setup = finetune.prepare(FinetuneJob(model=..., data="pairs.jsonl", task="dpo", out="adapters/dpo"))
    report = run(setup)      # evaluate, train, evaluate; OUT is a PEFT-format causal-lm adapter

DPO trains on (prompt, chosen, rejected) rows with `train.DPOObjective`; the frozen reference's log-probs of
every row (train and valid) are computed once before training where the config says so (`precompute_reference`),
since the reference never changes. GRPO samples `num_generations` completions per prompt from the adapter being
trained with the serving engine (rollouts.EngineSampler), scores them with the rewards (rewards.RewardScorer)
and trains with `train.GRPOObjective`. Either way only the trained adapter ("default") is saved: a frozen
reference adapter loaded beside it (`ref_adapter`) stays where it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, RandomSampler

from ..errors import LoraError
from ..hf import finetune
from ..train import DPOConfig, GRPOConfig, Trainer
from ..train.dpo import DPOObjective, dpo_metrics, reference_logps
from ..train.grpo import GRPOObjective, grpo_metrics
from ..train.metrics import Metric
from ..train.trainer import Callback
from .rewards import RewardError, RewardScorer, parse_reward
from .rollouts import EngineSampler

if TYPE_CHECKING:
    from ..train.batch import Objective

TASKS = ("dpo", "grpo")
TRAINED = "default"  # the adapter a job trains (apply_lora's and load_adapters' name); "reference" is the frozen one
REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")  # what precomputing adds to each DPO row


def config_of(task: str, values: dict[str, Any]) -> DPOConfig | GRPOConfig:
    """The task's config from `values` (the fields given; the rest keep TRL's defaults).

    A bad value raises LoraError naming the field as its `param` (a front end words it as its own flag); GRPO's
    reward specs are resolved here (rewards.parse_reward), so a typo fails before any model loads.

    Examples:
        >>> config_of("dpo", {"beta": 0.2}).beta
        0.2
        >>> config_of("grpo", {"num_generations": 1})
        Traceback (most recent call last):
        ...
        lorakit.errors.LoraError: num_generations=1 is invalid: expected an int >= 2
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} has no preference or RL config: expected one of {', '.join(TASKS)}")
    try:
        config = DPOConfig(**values) if task == "dpo" else GRPOConfig(**values)
    except ValueError as e:  # the config names the field first ("beta=-1.0 is invalid ..."): that is the param
        named = str(e).split("=", 1)[0]
        raise LoraError(  # param: the library's names, each a flag of the CLI (cli.common.PARAM_FLAGS)
            str(e),
            param=named
            if named
            in (
                "beta",
                "loss_type",
                "simpo_gamma",
                "num_generations",
                "max_completion_length",
                "temperature",
                "top_p",
                "top_k",
                "epsilon",
                "epsilon_high",
                "scale_rewards",
                "rewards",
                "reward_weights",
            )  # fmt: skip
            else None,
        ) from None
    if isinstance(config, GRPOConfig):  # each spec resolved now (a user's module imported), before any model loads
        for spec in config.rewards:
            try:
                parse_reward(spec)
            except RewardError as e:
                raise LoraError(str(e), param="rewards") from None
    return config


def reference_line(setup: finetune.Setup) -> str:
    """What the job's reference model is, in one line: `reference: base with the adapter disabled`, `reference:
    adapter DIR, frozen`, or why there is none (SimPO is reference-free; GRPO with beta 0 has no KL term)."""
    job, config = setup.job, _config(setup)
    if isinstance(config, DPOConfig) and config.loss_type == "simpo":
        return "reference: none (loss_type simpo is reference-free)"
    if isinstance(config, GRPOConfig) and config.beta == 0:
        return "reference: none (beta 0: no KL term, no reference pass)"
    if job.ref_adapter is not None:
        return f"reference: adapter {job.ref_adapter}, frozen"
    return "reference: base with the adapter disabled"


def run(setup: finetune.Setup, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Evaluate, train with the task's objective, evaluate again; write the trained adapter to `job.out` (PEFT
    format, task file "causal-lm") and return the report: hf.finetune.run's, plus the config under "align"."""
    job, config = setup.job, _config(setup)
    objective, metrics = _objective(setup, config)
    trainer = Trainer(
        setup.model, job.train, metrics=metrics, callbacks=callbacks, artifact_dir=Path(job.out) / finetune.RUN_DIR,
        objective=objective,
    )  # fmt: skip
    train, valid = setup.train_loader, setup.valid_loader
    if isinstance(config, DPOConfig) and _precomputes(config):
        train, valid = (_with_reference(setup, config, loader, trainer) for loader in (train, valid))
    extra = {
        "align": config.to_dict(),
        "init_adapter": str(job.init_adapter) if job.init_adapter is not None else None,
        "ref_adapter": str(job.ref_adapter) if job.ref_adapter is not None else None,
        "reference_model": reference_line(setup).removeprefix("reference: "),
    }
    return finetune.fit_and_save(setup, trainer, train, valid, adapter=TRAINED, extra=extra)


def _config(setup: finetune.Setup) -> DPOConfig | GRPOConfig:
    """The job's config (FinetuneJob fills it in for dpo/grpo)."""
    config = setup.job.align
    if not isinstance(config, (DPOConfig, GRPOConfig)):
        raise ValueError(f"task={setup.job.task!r} is not a preference or RL task: align.job.run runs dpo and grpo")
    return config


def _objective(setup: finetune.Setup, config: DPOConfig | GRPOConfig) -> tuple[Objective, list[Metric]]:
    """The objective the task trains with, and the metrics reading its per-row statistics."""
    model, tok = setup.model, setup.tokenizer
    if isinstance(config, DPOConfig):
        return DPOObjective(model, config), dpo_metrics()
    sampler = EngineSampler(
        model,
        tok,
        max_new_tokens=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        adapter=TRAINED,
    )
    scorer = RewardScorer(tok, config.rewards, config.weights)
    objective = GRPOObjective(model, config, sampler, scorer, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    return objective, grpo_metrics(scorer.names)


def _precomputes(config: DPOConfig) -> bool:
    """Whether the reference log-probs are computed once before training (SimPO has no reference)."""
    return config.precompute_reference and config.loss_type != "simpo"


def _with_reference(setup: finetune.Setup, config: DPOConfig, loader: DataLoader[Any], trainer: Trainer) -> Any:
    """`loader` over the same rows with the frozen reference's (chosen, rejected) log-prob sums in each row, in the
    same order, batch size, collate function and shuffle generator (so a resumed run reads the same batches)."""
    rows = list(loader.dataset)  # type: ignore[call-overload]  # a list of rows or an Arrow dataset: both iterate
    batch_size = loader.batch_size or setup.job.batch_size
    bf16 = setup.job.train.precision == "bf16"  # as the training steps run, so the cached values are a step's
    logps = reference_logps(
        setup.model, rows, loader.collate_fn, config=config, batch_size=batch_size, device=trainer.device, bf16=bf16
    )
    scored = [{**row, **dict(zip(REFERENCE_KEYS, pair, strict=True))} for row, pair in zip(rows, logps, strict=True)]
    return DataLoader(
        scored,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler),
        generator=loader.generator,
        collate_fn=loader.collate_fn,
    )
