"""Training beyond one process: RecBole's DDP set-up, made to work on CPU (gloo) as well as GPUs
(NCCL), with evaluation over the whole validation/test set, and a launcher.

One machine, N GPUs (or N CPU processes)::

    python -m recbole_mm.distributed --nproc=4 --model=MMSASRec --dataset=Scientific [--key=value ...]

Several machines (run on each; ``--offset`` = global rank of the node's first process)::

    node 0: python -m recbole_mm.distributed --nproc=4 --world_size=8 --offset=0 --ip=<node0> --port=5678 ...
    node 1: python -m recbole_mm.distributed --nproc=4 --world_size=8 --offset=4 --ip=<node0> --port=5678 ...

``--backend`` defaults to ``nccl`` with CUDA and ``gloo`` without. These are RecBole's own keys
(``nproc``, ``world_size``, ``offset``, ``ip``, ``port``) plus ``backend``; a config that sets
``local_rank`` makes ``recbole_mm.config.Config`` join the process group (``init_distributed_device``).

What RecBole 1.2.1 does and what changes here:

- RecBole's ``Config`` always uses ``backend="nccl"`` and CUDA devices, and its trainer wraps the
  model with ``DistributedDataParallel(device_ids=[local_rank])``: neither works on CPU.
- RecBole averages each rank's metrics weighted by ``len(batch)``, which for full-sort evaluation
  is the length of a 4-tuple, not the number of users, and ``DistributedSampler`` pads the last
  shard with repeated users. Here every rank's per-user ranking rows are gathered, the padding
  removed, and the metrics computed once over exactly the rows a single process would see: the
  distributed result equals the single-process evaluation of the same weights.
- Each rank named its own checkpoint file after its own clock; rank 0's name is used by all, and
  ranks wait for rank 0's write before loading a checkpoint.

Limitation: models with ``training_stages()`` (which change ``requires_grad`` between stages) are
refused under DDP, which fixes the set of trained parameters when it wraps the model.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from recbole.evaluator import Collector
from torch.nn.parallel import DistributedDataParallel

from recbole_mm.utils import RecboleMMError, get_model

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


# The evaluation rows that the collector accumulates batch by batch (one row per evaluated user).
PER_USER_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label")


def gather_shards(tensor, sample_size, device):
    """Rows of every rank in the order one process would have produced them, padding removed.

    ``DistributedSampler`` (no shuffling, as for evaluation) gives rank r the samples r, r+W, r+2W, ...
    of the index list padded with its own first entries to a multiple of W; every rank has the same
    number of rows, so interleaving the shards restores the order and the first ``sample_size`` rows
    are the real ones.
    """
    world_size = dist.get_world_size()
    local = tensor.to(device).contiguous()
    shards = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(shards, local)
    interleaved = torch.stack(shards, dim=1).reshape(-1, *local.shape[1:])
    if interleaved.shape[0] < sample_size:
        raise RuntimeError(f"gathered {interleaved.shape[0]} evaluation rows for {sample_size} samples")
    return interleaved[:sample_size].to(tensor.device)


class WholeEvalSetCollector(Collector):
    """A RecBole ``Collector`` whose data struct holds every rank's rows, so the evaluator computes
    the metrics of the whole evaluation set on each rank. ``sample_size``: set before each evaluation."""

    sample_size = None
    device = torch.device("cpu")

    def get_data_struct(self):
        struct = super().get_data_struct()
        for key in PER_USER_KEYS:
            if key in struct:
                struct.set(key, gather_shards(struct.get(key), self.sample_size, self.device))
        return struct


class DistributedTrainingMixin:
    """Put first in a RecBole trainer's bases: DDP on CPU and GPU, whole-set evaluation, one shared
    checkpoint file. Does nothing in a single process."""

    def __init__(self, config, model):
        distributed = not config["single_spec"]
        # RecBole's AbstractTrainer would wrap the model with device_ids=[local_rank], which CPU modules reject
        config["single_spec"] = True
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = not distributed
        if not distributed:
            return
        if getattr(model, "training_stages", None) and model.training_stages():
            raise RecboleMMError(
                f"{config['model']} trains in stages that change which parameters are trained; DDP fixes that set "
                "when it wraps the model, so those stages would silently stop synchronising. Train it in one process."
            )
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.distributed_model = DistributedDataParallel(
            self.model, device_ids=[self.device.index] if on_cuda else None
        )
        if config["eval_type"].name == "RANKING":
            self.eval_collector = WholeEvalSetCollector(config)
            self.eval_collector.device = self.device
        shared_name = [self.saved_model_file]
        dist.broadcast_object_list(shared_name, src=0)  # each rank named the file after its own clock
        self.saved_model_file = shared_name[0]

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if isinstance(self.eval_collector, WholeEvalSetCollector) and eval_data:
            self.eval_collector.sample_size = eval_data.sample_size
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)

    def _map_reduce(self, result, num_sample):
        if isinstance(self.eval_collector, WholeEvalSetCollector):
            return result  # already the whole set's metrics, identical on every rank
        return super()._map_reduce(result, num_sample)

    def load_model_checkpoint(self, checkpoint_file):
        if not self.config["single_spec"]:
            dist.barrier()  # only rank 0 writes checkpoints: wait until its write is complete
        return super().load_model_checkpoint(checkpoint_file)


def _worker(local_rank, model, dataset, config_file_list, config_dict, cmd_args, distributed, saved, queue):
    from recbole_mm.quick_start import run

    config_dict = {**(config_dict or {}), **distributed, "local_rank": local_rank}
    try:
        result = run(model, dataset, config_file_list, config_dict, saved=saved, cmd_args=cmd_args)
        if local_rank + distributed["offset"] == 0:
            queue.put(result)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(model, dataset, nproc=1, world_size=None, offset=0, ip="localhost", port=5678, backend=None,
           config_file_list=None, config_dict=None, cmd_args=(), saved=True):
    """Train ``nproc`` processes on this node (global ranks ``offset`` .. ``offset + nproc - 1`` of
    ``world_size``) with ``quick_start.run``; return global rank 0's result (None on other nodes)."""
    import torch.multiprocessing as mp

    for arg in cmd_args:
        key = arg[2:].split("=", 1)[0]
        if key in DISTRIBUTED_KEYS + ("local_rank",):
            raise RecboleMMError(f"--{key} is a launcher argument: pass it to launch() / before the overrides.")
    model_class = get_model(model) if isinstance(model, str) else model
    if hasattr(model_class, "prepare_run"):
        # once, before the workers start: they then reuse its cached outputs instead of racing to write them
        model_class.prepare_run(dataset, config_file_list, config_dict, list(cmd_args))
    distributed = {"nproc": nproc, "world_size": world_size or nproc, "offset": offset, "ip": ip,
                   "port": int(port), "backend": backend}
    # RecBole creates its log, tensorboard and checkpoint folders with exists-then-makedirs checks,
    # which the workers race on: create them once here
    from recbole_mm.config import Config

    checkpoint_dir = Config(model_class, dataset, config_file_list, config_dict, list(cmd_args))["checkpoint_dir"]
    for folder in (os.path.join("log", model_class.__name__), "log_tensorboard", checkpoint_dir):
        os.makedirs(folder, exist_ok=True)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(model, dataset, config_file_list, config_dict, list(cmd_args), distributed, saved, queue),
             nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recbole_mm.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", "-m", required=True)
    parser.add_argument("--dataset", "-d", required=True)
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this node (one per GPU)")
    parser.add_argument("--world_size", type=int, default=None, help="processes on all nodes (default nproc)")
    parser.add_argument("--offset", type=int, default=0, help="global rank of this node's first process")
    parser.add_argument("--ip", default="localhost", help="address of the node running global rank 0")
    parser.add_argument("--port", type=int, default=5678)
    parser.add_argument("--backend", default=None, choices=("nccl", "gloo"),
                        help="default: nccl with CUDA, gloo without")
    args, overrides = parser.parse_known_args(argv)
    config_files = args.config_files.split() if args.config_files else None
    try:
        result = launch(args.model, args.dataset, args.nproc, args.world_size, args.offset, args.ip, args.port,
                        args.backend, config_files, cmd_args=overrides)
    except RecboleMMError as error:
        print(f"recbole-mm: error: {error}", file=sys.stderr)
        return 2
    if result is not None:
        print(f"[recbole-mm] model={result['model']} dataset={result['dataset']} "
              f"valid={result['best_valid_result']} test={result['test_result']} checkpoint={result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
