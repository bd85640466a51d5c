"""Multi-process stages: one process per rank, each rank its share of the work, the main process writes what is
shared. The processes come from accelerate's launcher (torchrun underneath) on CPUs (gloo) and GPUs (NCCL):

    accelerate launch --multi_gpu --num_processes 2 -m mlpmem.cli datastore --run-dir RUN
    torchrun --nproc_per_node 2 -m mlpmem.cli datastore --run-dir RUN              # the same processes

accelerate 1.15 starts several processes only through that launcher (``--multi_gpu``, which on a machine without
GPUs starts CPU processes that join a gloo group) or mpirun; ``accelerate launch --cpu --num_processes N`` starts
ONE process, which would then run alone while the user believes it runs N. That launch is refused in one line
(``check_launch``). The process count is recorded in every manifest (``environment.processes``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlpmem.artifacts import (
    PROGRESS,
    StageBuild,
    chunk_digest,
    read_progress,
    verified_chunks,
    write_progress,
)
from mlpmem.errors import UsageError
from mlpmem.progress import progress

RANK_PROGRESS = "progress.rank{rank}.json"  # per-rank chunk lists (no shared-file races between ranks)
LAUNCH_HINT = (
    "accelerate launch --multi_gpu --num_processes N -m mlpmem.cli ... (CPU too) or torchrun --nproc_per_node N"
)


def launched_processes() -> int:
    """The processes of this launch as the launcher says (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _parent_num_processes() -> int | None:
    """``--num_processes N`` of the parent command (the ``accelerate launch`` that started us), where readable."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            value = arg.removeprefix(flag + "=") if arg.startswith(flag + "=") else None
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            if value is not None and value.isdigit():
                return int(value)
    return None


def check_launch() -> None:
    """Refuse a launch that asked for several processes but started one (``accelerate launch --cpu
    --num_processes N``, or N processes on one GPU without ``--multi_gpu``): accelerate's single-process launcher
    sets ACCELERATE_USE_CPU and no WORLD_SIZE, and MASTER_ADDR/MASTER_PORT only when N > 1."""
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    asked = _parent_num_processes()
    several = asked > 1 if asked is not None else bool(os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"))
    if several:
        raise UsageError(
            f"accelerate started one process where {asked or 'several'} were asked for (its --cpu launcher runs "
            f"one); use: {LAUNCH_HINT}"
        )


def on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def process_state(device: str = "auto"):
    """accelerate's process state (one process unless launched) and the torch device this rank works on.

    CPU processes join a gloo group; a launch whose processes would each run as the only one is refused.
    """
    from accelerate import PartialState  # works without any accelerate config in a single process

    from mlpmem.devices import resolve_device

    check_launch()
    state = PartialState(cpu=on_cpu(device))
    if launched_processes() > 1 and state.num_processes == 1:
        raise UsageError(f"launched as {launched_processes()} processes but accelerate sees one; use: {LAUNCH_HINT}")
    chosen = state.device if (state.num_processes > 1 and device == "auto") else resolve_device(device)
    return state, chosen


# sharded, resumable chunk loops ------------------------------------------------------------------------------
def recorded_chunks(build: StageBuild) -> dict[int, str]:
    """Chunks (-> digest of their rows) recorded done by a single process (progress.json) or by any rank."""
    done = read_progress(build.dir / PROGRESS)
    for path in build.dir.glob(RANK_PROGRESS.format(rank="*")):
        done |= read_progress(path)
    return done


def clear_rank_progress(build: StageBuild) -> None:
    for path in build.dir.glob(RANK_PROGRESS.format(rank="*")):
        path.unlink()


def run_chunks(
    build: StageBuild,
    state,
    n_chunks: int,
    size: Callable[[int], int],
    work: Callable[[int], int],
    desc: str,
    unit: str,
    rows: Callable[[int], Sequence[np.ndarray]],
) -> tuple[float, int]:
    """Run ``work(c)`` (which writes and flushes chunk c, returning the entries it computed) for this rank's chunks
    not yet done (chunk c belongs to rank c % processes), marking each done with the digest of its ``rows(c)``
    after it returns; all ranks wait for each other at the end. A chunk recorded done whose rows no longer match
    their digest is computed again. Returns (wall seconds until every rank finished, entries computed by all
    ranks); UsageError in the main process when, at the end, a chunk is not recorded done."""
    rank, world = state.process_index, state.num_processes
    recorded = recorded_chunks(build)
    mine = [c for c in range(n_chunks) if c % world == rank]
    done = {c: d for c, d in recorded.items() if c % world != rank} | verified_chunks(
        {c: d for c, d in recorded.items() if c % world == rank}, rows
    )
    bar = progress(
        total=sum(map(size, mine)),
        initial=sum(size(c) for c in mine if c in done),
        unit=unit,
        unit_scale=True,
        desc=desc,
        disable=not state.is_main_process,
    )
    todo = sum(size(c) for c in range(n_chunks) if c not in done)
    t0 = time.time()
    for c in (c for c in mine if c not in done):
        n = work(c)
        if world == 1:
            build.mark_chunk(c, done, rows(c))
        else:
            done[c] = chunk_digest(rows(c))
            write_progress(build.dir / RANK_PROGRESS.format(rank=rank), done)
        bar.update(n)
    bar.close()
    state.wait_for_everyone()
    missing = sorted(set(range(n_chunks)) - set(recorded_chunks(build))) if state.is_main_process else []
    if missing:  # the main process, before it clears the ranks' progress files
        raise UsageError(f"{build.dir}: chunks {missing[:5]} were not written; rerun the stage to compute them")
    return time.time() - t0, todo


def begin_shared(run, stage: str, config: Any, inputs: dict[str, str], state, setup=None) -> StageBuild:
    """The main process begins the stage (and runs ``setup(build)``, e.g. to allocate arrays); the others join it."""
    if state.is_main_process:
        build = run.begin(stage, config, inputs)
        if setup is not None:
            setup(build)
    state.wait_for_everyone()
    return build if state.is_main_process else run.join(stage)


def contiguous_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """[a, b): rank's contiguous block of n items (blocks in rank order, sizes differing by at most one)."""
    base, extra = divmod(n, world)
    a = rank * base + min(rank, extra)
    return a, a + base + (rank < extra)


def gather_to_main(obj: Any, state) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on the main process (None elsewhere); ``[obj]`` in a single process."""
    if state.num_processes == 1:
        return [obj]
    out = [None] * state.num_processes if state.is_main_process else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over every process (a tensor on ``device``: NCCL needs the GPU)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()
