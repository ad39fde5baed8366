"""Processes and signals: the process group that torchrun starts, and stopping a run on Ctrl-C / SIGTERM.

Data parallel (`torchrun --nproc_per_node N train.py ...`). torchrun starts N copies of the script and
tells each where it stands through the environment: WORLD_SIZE (N), RANK (0..N-1), LOCAL_RANK (its
index on this machine) and MASTER_ADDR / MASTER_PORT (where rank 0 listens). `init_distributed` joins
them into one process group, with one of torch.distributed's two backends:

    nccl   CUDA present: one GPU per process (cuda:LOCAL_RANK); collectives run on the GPUs
    gloo   CPU only: collectives go over TCP between the processes (also on one machine)

Every process holds the whole model; `data_parallel` wraps it in DistributedDataParallel, which
averages the gradients across the processes in backward, so the copies take identical steps. The
decisions a step takes (skip a non-finite update, stop) must be the same everywhere too, so the step
sums the loss and the stop requests of all processes in one all-reduce. `Processes` is how the core's
train_step asks for these sums (core/loop.py's OneProcess is the same for one process). Without torchrun, or with one
process, nothing here starts a group: rank 0 of 1.

Signals. Within `with StopSignal() as stop:` the first SIGINT (Ctrl-C) or SIGTERM only sets
`stop.signum`; the training loop notices it after the current step, saves a checkpoint and stops.
Another signal more than GRACE seconds after the first quits at once (KeyboardInterrupt): the way out
of a step that takes too long. Signals within GRACE of the first count as the same request, because
under torchrun Ctrl-C reaches each worker twice: from the terminal (the whole foreground process group
gets it) and again from torchrun, which signals its workers when it is interrupted itself.
"""
import contextlib
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from minipeft.core.loop import OneProcess


def init_distributed(device_type: str | None = None) -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    MASTER_ADDR, MASTER_PORT): nccl when the processes train on CUDA (`device_type` "cuda", or by
    default whenever CUDA is present; one GPU per process, by LOCAL_RANK), else gloo. Without torchrun,
    or with one process, nothing happens. Returns (rank, world_size)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return distributed()


def distributed() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) unless torch.distributed is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exit_process(code: int | None):
    """Leave as a script ends: sys.exit(code), or nothing for None (main returned). A process of several
    that torchrun started instead leaves at once with os._exit, stdout and stderr flushed, skipping the
    interpreter's finalization: once FSDP2's DTensors have held the process group, destroy_process_group
    no longer ends gloo's worker threads, and one that frees a finished collective's tensors while the
    interpreter finalizes cannot take the GIL and aborts the process ("terminate called without an active
    exception", SIGABRT), in place of the run's own exit code (tests/conftest.py, spawn_gloo_group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    if code is not None:
        sys.exit(code)


def device_for_process() -> torch.device:
    """The device a process trains on: its own GPU under torchrun with CUDA, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def data_parallel(model) -> DistributedDataParallel:
    """`model` (already on this process's device) wrapped so that backward averages the gradients
    across the processes; every process must call this, and rank 0's parameters are copied to all."""
    device = next(model.parameters()).device
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=True,  # a method may own trainable parameters a batch does not use
        forward_sync_buffers=False)  # buffers (RoPE tables, 4-bit weights) never change


class Processes(OneProcess):
    """The sums a step needs, over torchrun's processes (every process calls each method at the same point)."""

    def __init__(self):
        self.rank, self.size = distributed()

    def total(self, values: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(values)
        return values

    def backward_context(self, net, last: bool):
        # DDP averages the gradients across processes in backward; once per step is enough. FSDP
        # reduce-scatters after every micro-batch instead: a sum of averages is the average of sums,
        # and no process ever holds a whole gradient
        skip = self.size > 1 and not last and not is_sharded(net)
        return net.no_sync() if skip else contextlib.nullcontext()

    def whole_norm(self, norm: torch.Tensor) -> float:
        return whole_tensor(norm).item()  # under FSDP a DTensor over the shards


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (every process must call); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def check_same_options(options: dict, world_size: int):
    """Every process must train with the same options (a step's token count and its collectives assume
    it): a process whose options differ from rank 0's stops every process with one sentence."""
    if world_size == 1:
        return
    gathered = [None] * world_size
    dist.all_gather_object(gathered, options)
    for rank, theirs in enumerate(gathered):
        differ = sorted(k for k in options.keys() | theirs.keys() if gathered[0].get(k) != theirs.get(k))
        if differ:
            shown = ", ".join(f"{k} {gathered[0].get(k)!r} vs {theirs.get(k)!r}" for k in differ)
            raise ValueError(f"the processes were started with different options (rank 0 vs rank {rank}: "
                             f"{shown}); start every process with the same command")


class StopSignal:
    """Within `with StopSignal() as stop:` the first SIGINT or SIGTERM sets stop.signum; another one
    more than GRACE seconds after it raises KeyboardInterrupt (see the module docstring). `clock` gives
    the time in seconds (time.monotonic; tests pass their own)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    GRACE = 1.0

    def __init__(self, quiet: bool = False, clock=time.monotonic):
        self.quiet = quiet  # say nothing (processes other than rank 0)
        self.clock = clock

    def __enter__(self):
        self.signum, self.first, self.previous = None, None, {}
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.first = signum, self.clock()
            if not self.quiet:
                print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                      "(send it again to quit at once)", file=sys.stderr, flush=True)
        elif self.clock() - self.first > self.GRACE:
            self._restore()
            raise KeyboardInterrupt

    def _restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc):
        self._restore()
