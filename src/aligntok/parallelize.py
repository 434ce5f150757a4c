"""Data parallelism for the training loops: DDP or FSDP2, activation checkpointing, torch.compile.

Model files know nothing of this (docs/design.md section 2); `parallelize` applies it from outside, as
torchtitan does: activation checkpointing per block, then `torch.compile` per block, then FSDP2
`fully_shard` per block and finally on the root.

- Blocks are the items of a model's outermost `nn.ModuleList`s (`DiT.blocks`, `Decoder.up`, an encoder's
  block or layer list): the repeated units that are checkpointed, compiled and sharded one at a time.
- Frozen parameters (`requires_grad=False` when `parallelize` is called: the foundation encoder in
  tokenizer stages 1 and 3, its unused blocks, the adapter in stage 3) stay out of FSDP
  (`ignored_params`): replicated, never all-gathered, no gradient. DDP skips them by itself. Frozen modules
  that only make targets (the L_sp reference tokenizer, LPIPS, the VF encoder) are not passed here at all.
- bf16: compute precision comes from autocast in every mode (`distributed.autocast`), so the numerics are
  those of one device. Under FSDP the blocks' parameters are also all-gathered in bf16
  (`MixedPrecisionPolicy(param_dtype=bfloat16)`, half the traffic) and gradients reduced in fp32. Inputs are
  not cast (`cast_forward_inputs=False`): the DiT's timestep t and RoPE tables stay fp32 (t in bf16 keeps
  ~3 significant digits). The root (embedders, final layer, adapter, decoder stem) keeps fp32 parameters.
- A single process without torchrun runs unwrapped whatever the mode (there is nothing to synchronise, and
  no process group to do it with); under torchrun an explicit "ddp" or "fsdp" applies even to one rank, so
  that the code path can be checked on one GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from aligntok import distributed

MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(kw_only=True)
class ParallelConfig:
    """How a training run is spread over ranks. None of it changes the maths, so a run may resume with
    other settings (and on another number of ranks)."""

    # auto: none on one process, DDP on several. FSDP pays off once the model, its gradients and AdamW
    # state no longer fit one device beside the activations (docs/scaling.md has the arithmetic).
    mode: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"parallel.mode={self.mode!r}; use one of {', '.join(MODES)}")


def resolve_mode(mode: str, world_size: int, *, process_group: bool) -> str:
    """The mode that runs: "auto" is "none" on one rank and "ddp" on several; without a process group
    (a plain process, not torchrun) every mode is "none"."""
    if mode not in MODES:
        raise ValueError(f"parallel.mode={mode!r}; use one of {', '.join(MODES)}")
    if not process_group or (mode == "auto" and world_size == 1):
        return "none"
    return "ddp" if mode == "auto" else mode


def _outer_module_lists(module: nn.Module) -> Iterator[nn.ModuleList]:
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield child
        else:
            yield from _outer_module_lists(child)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def parallelize(model: nn.Module, cfg: ParallelConfig, *, bf16: bool = False) -> nn.Module:
    """Prepare `model` (already on this rank's device) for training; returns the module to call.

    FSDP2 shards `model` in place and returns it; DDP returns a wrapper around it. Either way `model` keeps
    the parameters: build optimizers, EMA and checkpoints from `model` after this call (FSDP2 replaces
    parameters by DTensor shards).
    """
    world = distributed.world()
    mode = resolve_mode(cfg.mode, world.world_size, process_group=torch.distributed.is_initialized())
    for blocks in _outer_module_lists(model):
        for i, block in enumerate(blocks):
            if not _trains(block):
                continue
            if cfg.activation_checkpointing:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

                # The wrapper's state-dict hooks drop its prefix: checkpoints and exports keep their keys.
                blocks[i] = block = checkpoint_wrapper(block)
            if cfg.compile:
                block.compile()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Our loops never modify a model's output in place, which is all this warning is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        frozen = {p for p in model.parameters() if not p.requires_grad}
        bf16_params = torch.bfloat16 if bf16 else None
        block_mp = MixedPrecisionPolicy(
            param_dtype=bf16_params, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        for blocks in _outer_module_lists(model):
            for block in blocks:
                if _trains(block):
                    fully_shard(block, mp_policy=block_mp, ignored_params=frozen & set(block.parameters()))
        fully_shard(model, ignored_params=frozen)
    return model


def full_state(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with every DTensor shard gathered into a full CPU tensor (a collective under FSDP: every
    rank calls it); plain tensors are moved to the CPU."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu() if isinstance(v, Tensor) else v
    return out


def full_grad_norm(norm: Tensor) -> Tensor:
    """The total norm `clip_grad_norm_` returns, as a plain tensor (a DTensor under FSDP)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm
