"""Device, precision and process-group setup: one CPU, one GPU, or ``torchrun`` DDP over one or many nodes.

Plain ``python script.py`` runs one process. Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
environment) every process joins a process group: NCCL on CUDA, Gloo on CPU. Only rank 0 writes files and logs.

This module is the one owner of the process group and the one reader of the launcher's environment: an entry point
(a ``kronos`` command, ``KronosPipeline.run``, a training stage) holds :func:`process_group` for its work, which
creates the group once (or joins the one that already exists) and yields the :class:`DistContext` that answers
"am I rank 0"; code without a context asks :func:`is_main_process`.

Work that only rank 0 does before the others may go on (taking the run lock, picking the run id, checking what it
alone reads) goes through :func:`on_main`: the other ranks wait for its outcome, and a refusal on rank 0 ends every
rank at once with the same one-line error, instead of leaving them waiting out a process-group timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kronos import errors
from kronos.config import Config
from kronos.errors import ConfigError, KronosError, cuda_missing_hint

logger = logging.getLogger(__name__)

# Timeout of the training collectives (all-reduce, broadcast): a hung peer fails the job after this long.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# Waits for rank-0-only work (prediction, evaluation, backtest) use their own CPU (gloo) group with this timeout,
# so a long evaluation never trips the training group's timeout or the NCCL watchdog (config key dist_wait_hours).
_WAIT: dict[str, Any] = {"hours": 48.0, "world": None, "group": None}


@dataclass
class DistContext:
    """Where this process runs and who it is among its peers."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = ""  # "" when not distributed
    owns_group: bool = False  # True when setup_distributed created the process group (and must destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or bool(self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set the standard DDP environment variables."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _group_is_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True in a plain process and on rank 0: of the process group when one is up, else of the ``torchrun`` launch
    (so it answers before the group is set up, e.g. for logging)."""
    if _group_is_up():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0").strip() in ("", "0")


def resolve_device(name: str, local_rank: int) -> torch.device:
    """Map config.device ('auto', 'cpu', 'cuda', 'cuda:N', 'mps') to a torch device for this process."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"config key 'device' is '{name}' but CUDA is not available: {cuda_missing_hint()} (or 'auto')"
            )
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"config key 'device' has an invalid CUDA device '{name}'; use e.g. 'cuda:0'") from None
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"config key 'device' is '{name}' but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ConfigError("config key 'device' is 'mps' but MPS is not available; set device to 'auto' or 'cpu'")
        return torch.device("mps")
    raise ConfigError(f"config key 'device' must be auto, cpu, cuda, cuda:N or mps, got '{name}'")


def _process_device(config: Config, local_rank: int, world_size: int) -> torch.device:
    """This process's device (made the current CUDA device when it is one)."""
    device = resolve_device(config.device, local_rank)
    if device.type == "mps" and world_size > 1:
        raise ConfigError("multi-process training on MPS is not supported; set device to 'cpu' or use CUDA")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def setup_distributed(config: Config) -> DistContext:
    """Pick the device and, under torchrun, join (or reuse) the process group.

    A group that already exists (e.g. created by the caller) is reused and left alone at cleanup; prefer
    :func:`process_group`, which pairs this with :func:`cleanup_distributed`.
    """
    if _group_is_up():
        return _existing_group(config)
    if not launched_by_torchrun():
        return DistContext(device=_process_device(config, 0, 1))

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = _process_device(config, local_rank, world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    _WAIT["hours"] = float(config.dist_wait_hours)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": COLLECTIVE_TIMEOUT}
    if device.type == "cuda":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # older torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    logger.debug("rank %d/%d on %s (%s)", rank, world_size, device, backend)
    return DistContext(
        device=device, rank=rank, local_rank=local_rank, world_size=world_size, backend=backend, owns_group=True
    )


def _existing_group(config: Config) -> DistContext:
    """The context of a process group someone else set up (rank and size from the group, not the environment)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _process_device(config, local_rank, world_size)
    _WAIT["hours"] = float(config.dist_wait_hours)
    return DistContext(
        device=device,
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        backend=str(dist.get_backend()),
        owns_group=False,
    )


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if ctx.owns_group and _group_is_up():
        dist.destroy_process_group()
        _WAIT["world"] = _WAIT["group"] = None


@contextlib.contextmanager
def process_group(config: Config) -> Iterator[DistContext]:
    """The process group of an entry point, for the ``with`` block: under ``torchrun`` with no group yet it is set
    up here and torn down after; a group that already exists (an outer entry point's, or the caller's) is joined
    and left alone; a plain process gets a one-process context. Yields the :class:`DistContext` (``ctx.is_main``:
    rank 0 or a plain process)."""
    ctx = setup_distributed(config)
    try:
        yield ctx
    finally:
        cleanup_distributed(ctx)


def _wait_group():
    """The CPU (gloo) group used for waits, made once per default group (every rank calls this at the same point)."""
    world = dist.group.WORLD
    if _WAIT["world"] is not world or _WAIT["group"] is None:
        _WAIT["group"] = dist.new_group(backend="gloo", timeout=timedelta(hours=_WAIT["hours"]))
        _WAIT["world"] = world
    return _WAIT["group"]


def wait_for_main() -> None:
    """Barrier of every rank after rank-0-only work: on a gloo group with the ``dist_wait_hours`` timeout, so other
    ranks can wait for a long prediction/evaluation/backtest without the job timing out. No-op without a group."""
    if _group_is_up() and dist.get_world_size() > 1:
        dist.barrier(group=_wait_group())


def share_text(text: str, limit: int = 200) -> str:
    """Rank 0's ``text`` (e.g. a run id), the same on every rank (as bytes in a tensor: nothing is pickled).
    Without a process group it is returned unchanged."""
    if not (_group_is_up() and dist.get_world_size() > 1):
        return text
    data = text.encode("utf-8")[:limit]
    buf = torch.zeros(limit + 1, dtype=torch.uint8)
    buf[0] = len(data)
    buf[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src=0, group=_wait_group())
    return bytes(buf[1 : 1 + int(buf[0])].tolist()).decode("utf-8")


def on_main(action: Callable[[], str | None]) -> str:
    """Run ``action`` on rank 0 only and give every rank its outcome: the text it returns (``""`` for None), the
    same on every rank; or, when it raises, the other ranks raise the same one-line error (the same
    :class:`~kronos.errors.KronosError` class; any other exception as a ``KronosError`` naming it) while rank 0
    raises the original. The other ranks wait on the gloo wait group (``dist_wait_hours``), so a slow ``action``
    (a run lock waited for) times nothing out. Without a process group it just calls ``action``.
    """
    if not (_group_is_up() and dist.get_world_size() > 1):
        return action() or ""
    if dist.get_rank() == 0:
        try:
            text = action() or ""
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the group may be broken too; rank 0's own error matters most
                _broadcast_bytes(b"E" + type(exc).__name__.encode() + b"\0" + _one_line(exc).encode("utf-8"))
            raise
        _broadcast_bytes(b"T" + text.encode("utf-8"))
        return text
    payload = _broadcast_bytes(b"")
    if payload[:1] == b"T":
        return payload[1:].decode("utf-8")
    name, _, message = payload[1:].decode("utf-8", "replace").partition("\0")
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, KronosError):
        raise cls(message)
    raise KronosError(f"rank 0 stopped with {name}: {message}")


def all_agree(ok: bool) -> bool:
    """A barrier of every rank on the wait group that returns True when every rank passed True (nothing pickled).
    Without a process group it returns ``ok``."""
    if not (_group_is_up() and dist.get_world_size() > 1):
        return bool(ok)
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_wait_group())
    return bool(flag.item())


def data_shard() -> Any:
    """This process's :class:`~kronos.data.processing.Shard` for the streaming data step: every rank of the group
    takes its share of the symbol chunks (a plain process: rank 0 of 1)."""
    from kronos.data.processing import Shard

    if not (_group_is_up() and dist.get_world_size() > 1):
        return Shard()
    return Shard(rank=dist.get_rank(), world_size=dist.get_world_size(), share=on_main, agree=all_agree)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _broadcast_bytes(data: bytes) -> bytes:
    """Rank 0's ``data`` on every rank (its length first, then the bytes; over the wait group, nothing pickled)."""
    group = _wait_group()
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if dist.get_rank() == 0 and data:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if buf.numel():
        dist.broadcast(buf, src=0, group=group)
    return bytes(buf.tolist())


def barrier(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum a few float64 numbers over all ranks (identity in a single process)."""
    if not (ctx.distributed and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu().tolist()]


def all_reduce_min_int(ctx: DistContext, value: int) -> int:
    if not (ctx.distributed and dist.is_initialized()):
        return int(value)
    t = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_flag(ctx: DistContext, flag: bool) -> bool:
    """Rank 0's decision, shared with every rank (e.g. early stopping)."""
    if not (ctx.distributed and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_gather_bytes(ctx: DistContext, payload: bytes) -> list[bytes]:
    """Every rank's byte string, in rank order (used to collect per-rank RNG states on rank 0)."""
    if not (ctx.distributed and dist.is_initialized()):
        return [payload]
    data = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(ctx.device)
        if payload
        else torch.zeros(0, dtype=torch.uint8, device=ctx.device)
    )
    size = torch.tensor([data.numel()], dtype=torch.int64, device=ctx.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=ctx.device)
    padded[: data.numel()] = data
    gathered = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded)
    return [bytes(g[: int(s.item())].cpu().numpy().tobytes()) for g, s in zip(gathered, sizes)]


# ---------------------------------------------------------------------------------------------- precision
@dataclass
class Precision:
    """Mixed-precision policy for one device: the autocast dtype (None = fp32) and whether to scale losses."""

    name: str  # fp32 | bf16 | fp16
    dtype: torch.dtype | None
    device_type: str
    use_scaler: bool
    reason: str = ""  # why this precision (logged at the start of training)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def compute(self) -> contextlib.AbstractContextManager:
        """Where a training step runs: TF32 matmuls only for a mixed-precision step on CUDA (restored after), so
        fp32 training and any later fp32 prediction in the same process keep full float32 matmuls."""
        return tf32_matmuls(self.dtype is not None and self.device_type == "cuda")


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def resolve_precision(config: Config, device: torch.device) -> Precision:
    """config.precision 'auto': bf16 on GPUs with native bfloat16 (compute capability >= 8), fp16 with a GradScaler
    on older GPUs, fp32 elsewhere. ``torch.cuda.is_bf16_supported()`` is not used: it counts slow emulation."""
    want = config.precision
    reason = f"precision '{want}' from the config"
    if want == "auto":
        if device.type == "cuda":
            major, minor = _cuda_capability(device)
            want = "bf16" if major >= 8 else "fp16"
            reason = (
                f"precision auto -> {want}: GPU compute capability {major}.{minor} "
                f"{'has native' if major >= 8 else 'lacks native'} bfloat16"
            )
        else:
            want = "fp32"
            reason = f"precision auto -> fp32 on {device.type}"
    if want == "fp32":
        return Precision("fp32", None, device.type, False, reason)
    if want == "bf16":
        if device.type == "cuda":
            major, minor = _cuda_capability(device)
            if major < 8:
                raise ConfigError(
                    f"config key 'precision' is 'bf16' but this GPU (compute capability {major}.{minor}) has no "
                    "native bfloat16 (it would be emulated and slow); use fp16, fp32 or auto"
                )
        if device.type == "mps":
            raise ConfigError("config key 'precision' 'bf16' is not supported on MPS; use fp32")
        return Precision("bf16", torch.bfloat16, device.type, False, reason)
    if want == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                f"config key 'precision' 'fp16' needs a CUDA device (got {device.type}); use bf16 or fp32"
            )
        return Precision("fp16", torch.float16, "cuda", True, reason)
    raise ConfigError(f"config key 'precision' must be one of auto, fp32, bf16, fp16, got '{want}'")


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 matmuls/convolutions on CUDA inside the block only (the previous settings are restored after)."""
    if not enabled:
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextlib.contextmanager
def deterministic_cpu(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms for the duration of a CPU run (restored afterwards)."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)
