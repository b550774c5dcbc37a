"""Loading a checkpoint into FSDP2 shards without a full copy of the model on every rank.

``from_pretrained`` on each of R ranks holds R full copies of the model in host memory at once
(Qwen3-8B in fp32: 8 x 32.8 GB per node) before sharding throws 1 - 1/R of each away. Here instead:

1. ``build_empty`` builds the model from its config with every *parameter* on the meta device (no
   memory, no random init) while *buffers* are computed on the CPU as usual: the non-persistent
   ones (rotary ``inv_freq``, ...) are in no checkpoint, so they must come from the constructor.
2. ``espo_lightning.policy.sharding`` applies ``fully_shard`` to the meta model (each rank's parameters
   become meta ``DTensor`` shards).
3. ``load_into_shards`` allocates each rank's shards (``to_empty``), puts the constructor's
   buffers back, and streams the checkpoint from rank 0: rank 0 reads each tensor in pieces of
   at most ``PIECE_BYTES`` straight from the ``.safetensors`` files (plain reads, not a memory map:
   a mapped file's touched pages count in the process's resident memory), broadcasts each piece,
   and every rank copies the rows of the piece that fall in its own shard.

Host memory per rank at load is then its shard plus one piece (rank 0: plus one piece being read);
on CUDA the shards and pieces live on the GPU and the host holds only rank 0's read buffer.
Checkpoints the stream cannot map name for name onto the model (``.bin`` files, renamed or fused
parameters, as transformers converts some on load) fall back to ``from_pretrained`` on rank 0 only,
streamed from its state dict the same way: one full copy per job instead of one per rank."""
from __future__ import annotations

import json
import logging
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from espo_lightning.errors import ConfigError

log = logging.getLogger(__name__)

PIECE_BYTES = 16 * 2**20  # the most bytes of one tensor in flight at a time (per broadcast)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# ----- 1. the model without its weights -----------------------------------------------------------
@contextmanager
def _parameters_on_meta():
    """Parameters registered inside go to the meta device; buffers stay where they are built. The
    constructor's CPU tensors for parameters are allocated but never written (``torch.empty``) and
    dropped at once; their pages are never touched."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_empty(path: str, dtype: torch.dtype, attn_implementation: str | None = None,
                trust_remote_code: bool = False):
    """The causal LM of ``path``'s config, with meta parameters and real (CPU) buffers, and the
    generation config ``from_pretrained`` would give it."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.model_name_or_path: cannot load a causal LM from {path!r} ({err})") from err
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass  # no generation_config.json: keep the one derived from the model config
    return model.eval()  # as from_pretrained returns it


# ----- 2. the checkpoint, read piece by piece ------------------------------------------------------
class SafetensorsReader:
    """Rows of the tensors in a folder's ``.safetensors`` files (one file, or an index and shards),
    read with ``readinto`` so that only the requested bytes ever reach this process's memory."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"no .safetensors weights in {folder}")
        self.entries: dict[str, tuple[Path, torch.dtype, torch.Size, int]] = {}
        for name in files:
            file = folder / name
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for key, info in header.items():
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{file}: tensor {key} has dtype {info['dtype']}, which this reader does not know")
                self.entries[key] = (file, _SAFETENSORS_DTYPES[info["dtype"]], torch.Size(info["shape"]),
                                     8 + length + info["data_offsets"][0])

    def shape(self, key: str) -> torch.Size:
        return self.entries[key][2]

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Rows ``[start, start + len(out))`` along dim 0 (the whole tensor for a 0-dim one) into
        ``out`` (``[rows, row_numel]``, any dtype and device): read straight into ``out`` when it is a
        CPU tensor of the file's dtype, else through a reused scratch buffer."""
        file, dtype, shape, offset = self.entries[key]
        row_bytes = shape[1:].numel() * dtype.itemsize
        direct = out.device.type == "cpu" and out.dtype == dtype
        target = out if direct else _scratch(out.numel() * dtype.itemsize).view(dtype)[:out.numel()]
        if target.numel():
            with open(file, "rb", buffering=0) as f:
                f.seek(offset + start * row_bytes)
                view = memoryview(target.view(torch.uint8).numpy()).cast("B")
                if f.readinto(view) != len(view):
                    raise OSError(f"{file}: truncated tensor {key}")
        if not direct:
            out.copy_(target.view(out.shape))


_SCRATCH: list[torch.Tensor] = []


def _scratch(nbytes: int) -> torch.Tensor:
    """A reused host buffer of at least ``nbytes`` (rank 0's reads that need a conversion or a copy to
    the GPU): allocating and freeing one per piece would leave glibc's heap holding freed pieces."""
    if not _SCRATCH or _SCRATCH[0].numel() < nbytes:
        _SCRATCH[:] = [torch.empty(max(nbytes, PIECE_BYTES), dtype=torch.uint8)]
    return _SCRATCH[0][:nbytes]


class _StateDictSource:
    """The fallback's source on rank 0: a model loaded with ``from_pretrained``."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict

    def shape(self, key: str) -> torch.Size:
        return self.state_dict[key].shape

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        t = self.state_dict[key]
        out.copy_((t.reshape(1) if t.dim() == 0 else t[start:start + len(out)]).reshape(out.shape))


# ----- 3. what the model expects -------------------------------------------------------------------
def _targets(model) -> list[tuple[list[str], torch.Tensor]]:
    """Each distinct parameter and persistent buffer once, with every name it goes by (a tied head
    and embedding share one tensor under two names), in the model's order (the same on all ranks)."""
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                names.setdefault(id(b), []).append(f"{module_name}.{name}" if module_name else name)
                tensors[id(b)] = b
    return [(names[i], tensors[i]) for i in names]


def _checkpoint_names(targets, source) -> list[str] | str:
    """For each target the checkpoint name to read it from, or why the checkpoint cannot be streamed
    name for name into the model."""
    chosen, known = [], set()
    for names, tensor in targets:
        known.update(names)
        found = [n for n in names if n in source.entries]
        if not found:
            return f"the checkpoint has no tensor {names[0]!r}"
        if source.shape(found[0]) != tensor.shape:  # a DTensor's shape is the full one
            return (f"{found[0]!r} is {tuple(source.shape(found[0]))} in the checkpoint, "
                    f"{tuple(tensor.shape)} in the model")
        chosen.append(found[0])
    extra = sorted(set(source.entries) - known)
    if extra:
        return f"the checkpoint has tensors the model does not ({extra[:3]}...)"
    return chosen


def _plan(path: str, targets, from_pretrained_kwargs: dict):
    """Rank 0: the source to read from and the checkpoint name of each target."""
    folder = Path(path)
    reason = "no local folder" if not folder.is_dir() else None
    if reason is None:
        try:
            reader = SafetensorsReader(folder)
            chosen = _checkpoint_names(targets, reader)
            if isinstance(chosen, list):
                return reader, chosen
            reason = chosen
        except (FileNotFoundError, ValueError) as err:
            reason = str(err)
    from transformers import AutoModelForCausalLM

    log.info("loading %s with from_pretrained on rank 0 and streaming it to the shards (%s)", path, reason)
    state_dict = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs).state_dict()
    return _StateDictSource(state_dict), [names[0] for names, _ in targets]


# ----- 4. materialise and stream ---------------------------------------------------------------------
def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of ``tensor`` and the first global row it holds. FSDP2 shards along dim 0
    only (``Shard(0)``); a plain tensor (a buffer) is held whole."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(tensor, DTensor):
        return tensor, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0)
           for p in tensor.placements):
        # sharding.py shards with fully_shard (Shard(0) on the data-parallel mesh), the only layout the
        # row-wise stream writes into; any other placement is a sharding this loader was not built for
        raise RuntimeError(f"loading streams checkpoint rows into Shard(0) DTensors (fully_shard); this parameter "
                           f"is placed {tensor.placements}")
    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tensor.to_local(), (offset[0] if offset else 0)


def _stream(tensor: torch.Tensor, source, key: str | None, buffer: torch.Tensor) -> torch.Tensor:
    """Broadcast ``tensor``'s full value from rank 0 (``source``'s ``key``) piece by piece through
    ``buffer`` (bytes, reused for every piece, grown if one row does not fit), each rank copying the
    rows of its own shard. Returns the buffer."""
    local, first = _local_rows(tensor)
    shape = tensor.shape
    rows_total = shape[0] if len(shape) else 1
    row_numel = shape[1:].numel() if len(shape) else 1
    row_bytes = max(1, row_numel * tensor.dtype.itemsize)
    if buffer.numel() < row_bytes:
        buffer = torch.empty(row_bytes, dtype=torch.uint8, device=buffer.device)
    step = buffer.numel() // row_bytes
    flat_local = local.reshape(local.shape[0] if len(shape) else 1, row_numel)  # a rank may hold 0 rows
    for start in range(0, rows_total, step):
        stop = min(rows_total, start + step)
        piece = buffer[:(stop - start) * row_bytes].view(tensor.dtype).view(stop - start, row_numel)
        if dist.get_rank() == 0:
            source.read_into(key, start, piece)
        dist.broadcast(piece, src=0)
        lo, hi = max(start, first), min(stop, first + flat_local.shape[0])
        if lo < hi:
            flat_local[lo - first:hi - first].copy_(piece[lo - start:hi - start])
    return buffer


@torch.no_grad()
def load_into_shards(model, path: str, device: torch.device, from_pretrained_kwargs: dict) -> None:
    """Allocate ``model``'s shards on ``device`` and fill them with ``path``'s weights, read on rank 0
    only (a collective: every rank calls it). ``model`` comes from ``build_empty`` and has been
    sharded since. ``from_pretrained_kwargs`` serve the fallback (see the module docstring)."""
    buffers = [(module, name, b) for module in model.modules() for name, b in module._buffers.items()
               if b is not None and name in module._non_persistent_buffers_set]
    model.to_empty(device=device)
    for module, name, b in buffers:  # to_empty dropped the constructor's values
        module._buffers[name] = b.to(device)
    targets = _targets(model)
    plan: list = [None]
    source = None
    if dist.get_rank() == 0:
        try:
            source, names = _plan(path, targets, from_pretrained_kwargs)
            plan[0] = names
        except Exception as err:  # told to every rank: the others wait for the plan in a collective
            plan[0] = f"cannot load a causal LM from {path!r} ({type(err).__name__}: {err})"
    dist.broadcast_object_list(plan, src=0)
    if isinstance(plan[0], str):
        raise ConfigError(f"model.model_name_or_path: {plan[0]}")
    buffer = torch.empty(PIECE_BYTES, dtype=torch.uint8, device=device)
    for (_, tensor), key in zip(targets, plan[0]):
        if tensor.numel():
            buffer = _stream(tensor, source, key, buffer)
    del source, buffer
    _SCRATCH.clear()
    if getattr(model.config, "tie_word_embeddings", False):
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and head.weight is not embed.weight:
            raise RuntimeError("the tied LM head lost its tie to the input embeddings while loading")
