"""Several processes (torchrun, accelerate launch, SLURM + torchrun): every process-rank decision lives here.

The same `llama-ft` code runs in every process. The launcher sets WORLD_SIZE/RANK/LOCAL_RANK; `setup` creates
accelerate's distributed state (the process group: NCCL on GPUs, gloo on the CPU) before any model is loaded, so
`from_pretrained` places the 4-bit weights on this process's GPU (DDP) or leaves them to FSDP / ZeRO-3 to shard.
Then:
  * `on_main(fn)`   the main process runs fn (writes the run folder, reads and tokenizes the data once), the others
                    wait and receive its result, or the same UserError;
  * `is_main()`     only it prints progress and "done", generates samples, writes metrics and pushes;
  * `any_rank(n)`   an all-reduce (max): a Ctrl-C or SIGTERM seen by any rank stops every rank at the same step;
  * `total(x)`      an all-reduce (sum): tokens trained on by all processes;
  * `engine()`      "single", "ddp", "fsdp" or "deepspeed", from what the launcher set; `is_sharded()` the last two.
A single process (plain `llama-ft`) takes none of these paths: everything is a no-op there.
"""

from __future__ import annotations

import os

from ft.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def engine() -> str:
    """How the weights are spread: accelerate launch's config says FSDP or DeepSpeed; otherwise DDP (one 4-bit
    copy per GPU) when there are several processes."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "deepspeed"
    return "ddp" if world_size() > 1 else "single"


def is_sharded() -> bool:
    """Whether the weights are spread across processes (FSDP or ZeRO-3): no one process holds the whole model, so
    none can generate alone; the base stays in its storage dtype; gradient checkpointing is reentrant, as PEFT's
    FSDP-QLoRA and DeepSpeed guides run it."""
    return engine() in ("fsdp", "deepspeed")


def setup() -> None:
    """Create the distributed state before anything is loaded (no-op in a single process). On a machine without
    GPUs the processes talk over gloo; without this, each would silently train alone."""
    if world_size() == 1:
        return
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # what TrainingArguments(use_cpu=True) will also ask for
    PartialState(cpu=cpu)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() != world_size():
        raise UserError(f"WORLD_SIZE={world_size()} but no process group of that size could be made; launch with "
                        "torchrun or accelerate launch (see docs/multi-gpu.md)")


def _group():
    import torch.distributed as dist

    return dist if world_size() > 1 and dist.is_available() and dist.is_initialized() else None


def on_main(fn):
    """fn() on the main process only; every process returns its result (sent to the others), or raises the
    UserError it raised, so no process waits forever for a main process that stopped."""
    dist = _group()
    if dist is None:
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value


def barrier() -> None:
    dist = _group()
    if dist is not None:
        dist.barrier()


def any_rank(value: int) -> int:
    """The largest `value` over all processes (0 where none is set): every rank learns of a signal any rank got."""
    return int(_reduce(value, "max"))


def total(value: float) -> float:
    """The sum of `value` over all processes (tokens each one trained on)."""
    return _reduce(value, "sum")


def _reduce(value, op: str):
    dist = _group()
    if dist is None:
        return value
    import torch
    from accelerate import PartialState

    tensor = torch.tensor([value], dtype=torch.float64 if op == "sum" else torch.long, device=PartialState().device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.item()


def main_print(*args, **kwargs) -> None:
    """print() on the main process only: the other processes' lines would repeat it."""
    if is_main():
        print(*args, **kwargs)
