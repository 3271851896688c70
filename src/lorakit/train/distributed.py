"""Training on several processes with PyTorch's own engine: torchrun, DDP, FSDP2, DistributedSampler.

`torchrun` starts one process per device and sets WORLD_SIZE, RANK and LOCAL_RANK; `Group.join` reads
them, initialises the process group (gloo on CPU, nccl on CUDA) and gives the trainer what it needs:

    wrap          DDP: the trainable (LoRA) parameters' gradients are averaged in the backward pass;
                  frozen parameters are not registered, so they never count as "unused".
                  FSDP2 (`fully_shard`, TrainConfig.fsdp): the frozen weights are sharded, one unit per
                  LoRA layer plus a root unit for the rest; the trainable parameters stay out of every
                  unit (`ignored_params`), replicated on each rank and averaged like DDP's. A LoRA layer
                  reads its frozen weight and its factors in one fused op, so the frozen unit is
                  gathered for that op; the factors, a few MiB, gain nothing from sharding, and being
                  plain tensors they keep checkpoints, clipping and adapter files exactly as on one process.
    shard_loader  each rank reads its own slice of the train set (DistributedSampler, reshuffled per epoch).
    sum           sums across ranks (metrics, sample counts), so every rank logs the same numbers.

Gradients are averaged over ranks, so 2 ranks × batch b step like 1 process with batch 2b when the loss
is a mean over equally many items per rank. Without a launch (or WORLD_SIZE=1) `Group` is one process
and every method is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

if TYPE_CHECKING:
    from ..fingerprint import Fingerprints

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch.

    Examples:
        >>> Launch.from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
        Launch(world_size=2, rank=1, local_rank=1)
        >>> Launch.from_env({}) is None
        True
    """

    world_size: int
    rank: int
    local_rank: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch | None:
        """The launch torchrun describes in `env` (default os.environ); None when it is not set."""
        env = os.environ if env is None else env
        present = [name for name in ENV if name in env]
        if not present:
            return None
        if len(present) < len(ENV):
            raise ValueError(
                f"a torchrun launch sets {', '.join(ENV)}; only {', '.join(present)} "
                "is set here (start with torchrun, or unset them)"
            )
        values = []
        for name in ENV:
            try:
                values.append(int(env[name]))
            except ValueError:
                raise ValueError(f"{name}={env[name]!r} is invalid: expected an integer") from None
        world, rank, local = values
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ValueError(
                f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local} are inconsistent: "
                "expected WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
            )
        return cls(world, rank, local)


def rank() -> int:
    """This process's rank: in the process group, else the one torchrun set (0 when not launched)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    launch = Launch.from_env()
    return launch.rank if launch else 0


def is_main() -> bool:
    """Whether this process writes files and reports: rank 0, or the only process."""
    return rank() == 0


class Group:
    """The processes training one model: several under torchrun, else one (every method a no-op)."""

    def __init__(
        self, world_size: int = 1, rank: int = 0, local_rank: int = 0, device: torch.device | None = None
    ) -> None:
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.device = device or torch.device("cpu")  # where collectives' tensors live (nccl: CUDA)
        self.fsdp = False  # set by wrap()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes artifacts, checkpoints, adapters and the dashboard."""
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device) -> tuple[Group, torch.device]:
        """(group, this rank's device): join (initialising once) the process group of a torchrun launch.

        On CUDA each rank takes `cuda:LOCAL_RANK` unless a device index was given.
        """
        launch = Launch.from_env()
        if dist.is_available() and dist.is_initialized():  # the caller (or an earlier Trainer) did it
            world, rank = dist.get_world_size(), dist.get_rank()
            local = launch.local_rank if launch else rank
        elif launch is None or launch.world_size == 1:
            return cls(), device
        else:
            world, rank, local = launch.world_size, launch.rank, launch.local_rank
        if world == 1:
            return cls(), device
        if device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"device {str(device)!r} cannot train under torchrun: "
                "distributed training runs on 'cpu' (gloo) or 'cuda' (nccl)"
            )
        if device.type == "cuda":
            device = device if device.index is not None else torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
            )
            atexit.register(_destroy)
        return cls(world, rank, local, device), device

    # -- the model --------------------------------------------------------------------------------

    def wrap(
        self, model: nn.Module, device: torch.device, fsdp: bool, fingerprints: Fingerprints | None = None
    ) -> nn.Module:
        """The module to call in training: `model` itself, its DDP wrapper, or `model` sharded by FSDP2.

        `model` keeps its parameter names either way (checkpoints and adapters use them). Before sharding, the
        base is fingerprinted into `fingerprints`, which the saves after it must be given.
        """
        if self.world_size == 1:
            return model
        if not fsdp:
            ids = [device.index] if device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from ..fingerprint import remember_before_sharding
        from ..model import lora_layers

        if fingerprints is not None:
            remember_before_sharding(
                model, fingerprints
            )  # a save after sharding could not hash whole weights (lorakit.json)
        trainable = [p for p in model.parameters() if p.requires_grad]  # a list: the same order on every rank
        with torch.no_grad():  # replicated parameters must start equal, as DDP's broadcast makes them
            for p in trainable:
                dist.broadcast(p.data, src=0)
        ignored = set(trainable)
        mesh = init_device_mesh(device.type, (self.world_size,))
        for layer in lora_layers(model).values():  # one unit each: gathered just for that layer's op
            fully_shard(layer, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        self.fsdp = True
        return model

    @contextlib.contextmanager
    def no_sync(self, net: nn.Module, skip: bool) -> Iterator[None]:
        """With `skip`, this micro-batch's gradients stay local (accumulation); they are averaged at the step."""
        if self.world_size == 1 or not skip:
            yield
        elif isinstance(net, nn.parallel.DistributedDataParallel):
            with net.no_sync():
                yield
        else:  # FSDP: the trainable gradients are averaged by average_gradients at the step anyway
            yield

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Under FSDP, average the replicated trainable parameters' gradients over ranks (DDP did it already)."""
        if not self.fsdp:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective instead of one per tensor
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- data and numbers -------------------------------------------------------------------------

    def shard_loader(self, loader: Iterable[Any], seed: int) -> Iterable[Any]:
        """`loader` rebuilt so this rank reads its slice: a DistributedSampler (shuffled if the loader was)
        seeded with `seed`; the trainer calls its `set_epoch` each epoch. A loader that already has a
        DistributedSampler is used as it is.
        """
        if self.world_size == 1:
            return loader
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            raise TypeError(
                "under torchrun the train data must be a torch DataLoader over a map-style dataset "
                "(lorakit gives each rank its slice with a DistributedSampler); "
                f"got {type(loader).__name__}"
            )
        if isinstance(loader.sampler, DistributedSampler):
            return loader
        if loader.batch_size is None:
            raise ValueError(
                "under torchrun the train DataLoader needs batch_size= (it has a custom batch_sampler); "
                "or build it with a torch.utils.data.DistributedSampler yourself"
            )
        sampler: DistributedSampler[Any] = DistributedSampler(
            loader.dataset,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=seed,
        )
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            generator=loader.generator,
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
            pin_memory_device=loader.pin_memory_device,
        )

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over ranks (float64)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order (picklable objects: RNG states)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size  # filled with every rank's obj
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            dist.barrier()


def _destroy() -> None:
    """Leave the process group at exit (torch warns about one left behind)."""
    if dist.is_initialized():
        dist.destroy_process_group()
