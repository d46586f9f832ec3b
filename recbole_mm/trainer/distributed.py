"""DDP inside RecBole's trainer: CPU and GPU, evaluation over the whole validation/test set, one
shared checkpoint file (``recbole_mm.quick_start.distributed`` has the launcher and what changes
from RecBole 1.2.1)."""
import torch
import torch.distributed as dist
from recbole.evaluator import Collector
from torch.nn.parallel import DistributedDataParallel

from recbole_mm.utils import RecboleMMError

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
