"""Fully sharded data parallel (`torchrun --nproc_per_node N train.py ... --fsdp`): FSDP2's `fully_shard`.

Data parallel (processes.py) keeps the whole model in every process. FSDP keeps 1/N of it: every
parameter, frozen or trainable, is cut along its first dimension into N row blocks (torch.chunk; the
last blocks may be shorter or empty) and process r keeps block r, as a DTensor whose `to_local()` is
that block. The gradients and AdamW's moments of a parameter are sharded the same way. A layer needs
its whole weights only while it computes, so `shard` groups the parameters by transformer block:

    fully_shard(blocks[i]) for every block, then fully_shard(model)    (the root: embeddings, ln_f, head)

    forward of block i:   all-gather its parameters (N blocks of rows -> whole) · compute · free them
    backward of block i:  all-gather again · compute the gradients · reduce-scatter them: process r
                          receives rows r of the gradient, averaged over the processes, and frees the rest
    optimizer step:       every process updates its own rows only (AdamW is elementwise)

So one step equals a single-process step on the global batch (batch_size × N), like data parallel.
The root's parameters (embeddings, final norm, head) are gathered at the start of forward and kept
until the end of backward. Memory per process, W = weights, G = gradients, O = optimizer state:

    M ≈ (W_frozen + W_trainable + G + O) / N  +  W_root + W_block (the block being computed)  +  activations

QLoRA's Linear4bit keeps its 4-bit codes and quantization state as buffers; FSDP2 would leave
buffers whole in every process. `shard` turns each one with at least one dimension (codes, absmax, the
double-quantized absmax codes and scales, bias) into a frozen parameter (requires_grad=False, same
name, so state_dict keys do not change), which FSDP2 shards, all-gathers and frees like any weight;
only the scalar `weight_absmax_offset` stays a buffer (fully_shard refuses 0-d parameters). Other
buffers (RoPE tables) are computed, not trained, and stay whole in every process: `bytes_per_process`
counts them as replicated.

Checkpoints stay in the single-process format. `whole(model, optimizer)` (every process enters)
swaps the trainable parameters and AdamW's moments for whole tensors: with only=0 they are gathered in
rank 0 alone, which saves the adapter and the optimizer state as usual inside it; a resumed run loads
into whole tensors in every process, each keeping its own rows on leaving. A checkpoint records that
it was sharded (trainer.run_options), so it resumes only under --fsdp with the same number of
processes.

Gradients are averaged, not summed, over gloo too. pytorch issue #162338 ("Incorrect AVG reduction
for GLOO", 2025, reproduced with fully_shard) reports FSDP2 gradients over gloo that are not the
average; in torch 2.13 the reduce-scatter averages (measured: 2 processes vs 1 agree to 1e-7, a sum
would be twice the average), and tests/test_fsdp.py compares every gradient with a single process's at
every step, so no correction is applied here.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .processes import distributed, whole_tensor
from minipeft.core.nf4 import Linear4bit


def check_launch():
    """--fsdp needs several processes started by torchrun (it reads WORLD_SIZE); stop before any work
    otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2:
        raise ValueError("--fsdp shards the model across processes, but this is a single process "
                         f"(WORLD_SIZE {os.environ.get('WORLD_SIZE', 'unset')}); start it with "
                         "torchrun --nproc_per_node 2 (or more) train.py ... --fsdp")


def shard(model) -> nn.Module:
    """Shard `model` (a minipeft Transformer, its method applied) across the processes of the
    torch.distributed group: each block, then the root (see the module docstring). Every process must
    call this. Returns the model, whose parameters are now DTensors; build the optimizer after."""
    _, world_size = distributed()
    if world_size < 2:
        raise ValueError("sharding needs a process group of 2 or more processes (torchrun)")
    for layer in model.modules():
        if isinstance(layer, Linear4bit):
            _buffers_to_frozen_parameters(layer)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _buffers_to_frozen_parameters(layer: Linear4bit):
    """The 4-bit layer's codes and quantization state as frozen parameters, which FSDP2 shards."""
    for name, tensor in list(layer._buffers.items()):
        if tensor is not None and tensor.ndim >= 1:
            del layer._buffers[name]
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def gather(tensor: torch.Tensor, to: int) -> torch.Tensor | None:
    """A DTensor sharded by rows (FSDP's Shard(0)), whole in process `to` only; None in the others,
    which just send their rows. Any other tensor as it is. Every process must call."""
    if not isinstance(tensor, DTensor):
        return tensor
    rank, world_size = distributed()
    rows = -(-tensor.shape[0] // world_size)  # torch.chunk's blocks: process r holds rows r·rows .. (r+1)·rows
    local = tensor.to_local()
    padded = local.new_zeros((rows, *tensor.shape[1:]))  # (rows, ...): the last blocks may be short or empty
    padded[:len(local)] = local
    blocks = [torch.empty_like(padded) for _ in range(world_size)] if rank == to else None
    dist.gather(padded, blocks, dst=to)
    return torch.cat(blocks)[:tensor.shape[0]] if rank == to else None


def shard_like(tensor: torch.Tensor, param: DTensor) -> DTensor:
    """This process's rows of the whole `tensor`, laid out like `param` (no communication)."""
    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@contextlib.contextmanager
def whole(model, optimizer=None, only: int | None = None):
    """Inside `with whole(model, optimizer):` the model's trainable parameters and the optimizer's
    state are whole tensors, the same in every process (checkpoint.py restores them as for a single
    process), and on leaving every process keeps its rows of whatever they hold then. With only=r they
    are whole in process r alone, to be read (rank 0 saves a checkpoint): the others just send their
    rows, and on leaving every process has its shards back as they were. Every process must enter.
    Nothing happens for an unsharded model."""
    slots = [(module, name, p) for module in model.modules() for name, p in module._parameters.items()
             if isinstance(p, DTensor) and p.requires_grad]
    receives = only is None or distributed()[0] == only
    # the optimizer's parameters in a fixed order, the same in every process (gathers must pair up)
    params = [p for group in optimizer.param_groups for p in group["params"]] \
        if optimizer is not None and slots else []
    sharded_state = {}  # parameter -> its optimizer state as it was, shards
    with torch.no_grad():
        gathered = {}  # id(sharded parameter) -> the whole one (tied parameters are gathered once)
        for module, name, p in slots:
            if id(p) not in gathered:
                whole_p = p.full_tensor() if only is None else gather(p, only)
                gathered[id(p)] = nn.Parameter(whole_p) if receives else None
            if receives:
                module._parameters[name] = gathered[id(p)]
        for p in params:
            if p in optimizer.state:
                state = optimizer.state[p]
                sharded_state[p] = dict(state)
                whole_state = {key: whole_tensor(value) if only is None else gather(value, only)
                               for key, value in state.items()}
                if receives:
                    state.update(whole_state)
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, p in slots:
                if only is None:
                    p.to_local().copy_(shard_like(gathered[id(p)], p).to_local())
                module._parameters[name] = p
            if only is not None:  # read only: the shards as they were
                for p, state in sharded_state.items():
                    optimizer.state[p].update(state)
            elif params:  # optimizer.state afresh: load_state_dict replaces the dict
                for p, state in optimizer.state.items():
                    for key, value in state.items():  # AdamW's "step" is a scalar, the same everywhere
                        if isinstance(p, DTensor) and key != "step" and value.shape == p.shape:
                            state[key] = shard_like(value, p)


def bytes_per_process(model) -> dict:
    """What each process holds (every process must call): {"whole": {kind: bytes}, "processes":
    [{kind: bytes} for each rank]}, kind = "frozen" and "trainable" (parameters; a process's shard,
    with FSDP's padding of the last rows) and "buffers" (whole in every process)."""
    rank, world_size = distributed()

    def held(p):  # the storage FSDP allocated for this process's rows (padded to equal row blocks)
        return p.to_local().untyped_storage().nbytes() if isinstance(p, DTensor) else p.nbytes

    kinds = ("frozen", "trainable", "buffers")
    whole_bytes = dict.fromkeys(kinds, 0)
    mine = torch.zeros(len(kinds), dtype=torch.float64)
    for p in model.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        whole_bytes[kind] += p.numel() * p.element_size()
        mine[kinds.index(kind)] += held(p)
    for b in model.buffers():
        whole_bytes["buffers"] += b.nbytes
        mine[2] += b.nbytes
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(every, mine)
    else:
        every = [mine]
    return {"whole": whole_bytes, "processes": [dict(zip(kinds, map(int, t.tolist()))) for t in every]}


def format_bytes_per_process(measured: dict) -> str:
    """bytes_per_process as lines for the user."""
    whole = measured["whole"]

    def mib(n: int, of: int | None = None) -> str:
        return f"{n / 2**20:,.2f} MiB" + (f" ({n / of:.1%})" if of else "")

    rows = [f"FSDP: whole model {mib(whole['frozen'])} frozen + {mib(whole['trainable'])} trainable parameters, "
            f"{mib(whole['buffers'])} buffers"]
    for rank, held in enumerate(measured["processes"]):
        rows.append(f"  process {rank} holds {mib(held['frozen'], whole['frozen'])} frozen + "
                    f"{mib(held['trainable'], whole['trainable'])} trainable, {mib(held['buffers'])} buffers "
                    "(whole in every process)")
    return "\n".join(rows)
