"""Training beyond one process: RecBole's DDP set-up, made to work on CPU (gloo) as well as GPUs
(NCCL), with evaluation over the whole validation/test set, and a launcher.

One machine, N GPUs (or N CPU processes)::

    python -m recbole_mm.quick_start.distributed --nproc=4 --model=MMSASRec --dataset=Scientific [--key=value ...]

Several machines (run on each; ``--offset`` = global rank of the node's first process)::

    node 0: python -m recbole_mm.quick_start.distributed --nproc=4 --world_size=8 --offset=0 --ip=<node0> --port=5678 ...
    node 1: python -m recbole_mm.quick_start.distributed --nproc=4 --world_size=8 --offset=4 --ip=<node0> --port=5678 ...

``--backend`` defaults to ``nccl`` with CUDA and ``gloo`` without. These are RecBole's own keys
(``nproc``, ``world_size``, ``offset``, ``ip``, ``port``) plus ``backend``; a config that sets
``local_rank`` makes ``recbole_mm.config.Config`` join the process group (``recbole_mm.utils.distributed``).

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

import torch.distributed as dist
import torch.multiprocessing as mp

from recbole_mm.config import Config
from recbole_mm.quick_start.quick_start import prepare_inputs, run
from recbole_mm.utils import RecboleMMError, get_model
from recbole_mm.utils.distributed import DISTRIBUTED_KEYS


def _worker(local_rank, model, dataset, config_file_list, config_dict, cmd_args, distributed, saved, queue):
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
    for arg in cmd_args:
        key = arg[2:].split("=", 1)[0]
        if key in DISTRIBUTED_KEYS + ("local_rank",):
            raise RecboleMMError(f"--{key} is a launcher argument: pass it to launch() / before the overrides.")
    model_class = get_model(model) if isinstance(model, str) else model
    # once, before the workers start: they then reuse its cached outputs instead of racing to write them
    config_dict = prepare_inputs(model_class, dataset, config_file_list, config_dict, list(cmd_args))
    distributed = {"nproc": nproc, "world_size": world_size or nproc, "offset": offset, "ip": ip,
                   "port": int(port), "backend": backend}
    # RecBole creates its log, tensorboard and checkpoint folders with exists-then-makedirs checks,
    # which the workers race on: create them once here
    checkpoint_dir = Config(model_class, dataset, config_file_list, config_dict, list(cmd_args))["checkpoint_dir"]
    for folder in (os.path.join("log", model_class.__name__), "log_tensorboard", checkpoint_dir):
        os.makedirs(folder, exist_ok=True)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(model, dataset, config_file_list, config_dict, list(cmd_args), distributed, saved, queue),
             nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recbole_mm.quick_start.distributed", description=__doc__,
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
