"""The NCCL weight path of ``VLLMServerEngine`` (``weight_transfer: collective``): trainer rank 0
joins an NCCL group with the server's GPU workers and broadcasts each tensor from its GPU, following
vLLM 0.32's ``vllm.distributed.weight_transfer`` (its TCPStore rendezvous and packed broadcast on the
trainer side, the NCCL engine on the server side). Imported only when that path is taken: it needs
vLLM and CUDA on both sides."""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import torch

from espo_lightning.engines.vllm_server_engine import _info
from espo_lightning.errors import EngineError


def join_group(engine):
    """Rank 0 opens the group's rendezvous (vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator``,
    as ``vllm.distributed.weight_transfer.nccl_common.trainer_init``) while the server's workers
    join it inside ``/init_weight_transfer_engine``."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload
    from vllm.utils.nccl import unpinned_nccl_env

    workers = int(engine._collective["workers"])
    address = engine.collective_address or _route_address(engine.url)
    port = engine.collective_port or _free_port(address)
    info = NCCLWeightTransferInitInfo(master_address=address, master_port=port, rank_offset=1,
                                      world_size=1 + workers, packed=True)
    _info(f"VLLMServerEngine: weights -> server via NCCL group (trainer rank 0 + {workers} server workers, "
          f"rendezvous at {address}:{port}; weight_transfer={engine.weight_transfer})")
    exe = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-server-weights")
    try:
        future = exe.submit(engine._call, "POST", "/init_weight_transfer_engine",
                            {"init_info": worker_init_payload(info)}, engine.weights_timeout_s,
                            "joining the NCCL weight-transfer group")
        _fail_fast(future)  # a refused request surfaces here, not as a wait in the rendezvous
        group = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=1 + workers,
                                             store_timeout=int(engine.weights_timeout_s))
        with unpinned_nccl_env():
            communicator = PyNcclCommunicator(group, device=torch.cuda.current_device())
        future.result()
    finally:
        exe.shutdown(wait=False)  # never wait on a request stuck in a collective
    return communicator



def broadcast(engine, pairs, meta: list, version: int | None) -> None:
    """Announce names, dtypes and shapes (``/update_weights``, in flight), then broadcast the
    tensors in that order with vLLM's packed producer, as ``NCCLTrainerWeightTransferEngine``."""
    from dataclasses import asdict

    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo
    from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

    info = NCCLWeightTransferUpdateInfo(names=[m[0] for m in meta],
                                        dtype_names=[str(m[1]).split(".")[-1] for m in meta],
                                        shapes=[list(m[2]) for m in meta])
    exe = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-server-weights")
    try:
        future = exe.submit(engine._call, "POST", "/update_weights",
                            {"update_info": asdict(info), "version": version}, engine.weights_timeout_s,
                            "pushing weights")
        _fail_fast(future)
        packed_nccl_broadcast_producer(iterator=checked(pairs, meta), group=engine._group, src=0,
                                       post_iter_func=lambda item: item[1])
        torch.cuda.current_stream().synchronize()
        answer = future.result()
    finally:
        exe.shutdown(wait=False)
    if answer.get("failed_layers"):
        raise EngineError(f"vLLM server {engine.url}: received no weights for layers {answer['failed_layers']} and "
                          "kept stale ones: the policy's weight names do not map to the served model's")



def _fail_fast(future, wait_s: float = 1.0) -> None:
    """Raise a request's error if it comes within ``wait_s`` (the server refuses before any NCCL call)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    try:
        future.result(timeout=wait_s)
    except FutureTimeout:
        pass


def checked(pairs, meta: list):
    """The tensors as announced (vLLM's ``_checked_iter``): a disagreement with the metadata is an
    error naming the tensor, not a receiver that splits the stream differently and hangs."""
    sent = 0
    for name, tensor in pairs:
        if sent >= len(meta):
            raise ValueError(f"more tensors than announced ({len(meta)}); first extra {name!r}")
        want = meta[sent]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want[0], want[1], tuple(want[2])):
            raise ValueError(f"tensor {sent} is {name!r} {tensor.dtype} {tuple(tensor.shape)}, announced "
                             f"{want[0]!r} {want[1]} {tuple(want[2])}")
        sent += 1
        yield name, tensor.contiguous()
    if sent != len(meta):
        raise ValueError(f"{sent} tensors sent, {len(meta)} announced")


def _route_address(url: str) -> str:
    """This host's address on the route to the server (where its workers can reach the rendezvous)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((parsed.hostname, parsed.port or 80))  # no packet is sent
        return probe.getsockname()[0]


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]
