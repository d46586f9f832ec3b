"""Joining a DDP process group from a config: RecBole's set-up, made to work on CPU (gloo) as well as GPUs (NCCL)."""
import os

import torch
import torch.distributed as dist

from recbole_mm.utils.utils import RecboleMMError

DISTRIBUTED_KEYS = ("nproc", "world_size", "offset", "ip", "port", "backend")


def init_distributed_device(config_dict):
    """Join the process group described by the config (RecBole's keys) and set ``device``.

    Replaces the distributed branch of RecBole's ``Config._init_device``, which hard-codes NCCL and
    CUDA; ``backend`` (``nccl`` | ``gloo``) defaults to what the machine supports.
    """
    gpu_id = config_dict["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id)
    config_dict["gpu_id"] = gpu_id
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    use_cuda = bool(gpu_id) and torch.cuda.is_available() and config_dict.get("use_gpu", True)
    backend = config_dict.get("backend") or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise RecboleMMError("backend: nccl needs CUDA GPUs; on CPU use --backend=gloo.")
    local_rank, nproc = config_dict["local_rank"], config_dict["nproc"]
    if use_cuda and len(gpu_id.split(",")) < nproc:
        raise RecboleMMError(f"--nproc={nproc} processes on this node but gpu_id={gpu_id!r} lists fewer GPUs.")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=local_rank + config_dict["offset"],
                                world_size=config_dict["world_size"],
                                init_method=f"tcp://{config_dict['ip']}:{config_dict['port']}")
    config_dict["backend"] = backend
    config_dict["single_spec"] = False
    if use_cuda:
        torch.cuda.set_device(local_rank)
        config_dict["device"] = torch.device("cuda", local_rank)
    else:
        config_dict["device"] = torch.device("cpu")
    if local_rank + config_dict["offset"] != 0:  # as RecBole: only global rank 0 logs and shows progress
        config_dict.update(state="error", show_progress=False, verbose=False)
