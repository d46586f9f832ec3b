"""DDP with 2 CPU processes (gloo) on a Scientific slice: training runs, and the distributed
validation/test metrics are those of the whole evaluation set, not of one rank's shard."""
import socket

import pytest
import torch

from recbole_mm.quick_start.distributed import launch
from recbole_mm.trainer.distributed import gather_shards
from recbole_mm.quick_start import build
from recbole_mm.config import PROPERTIES_DIR
from tests.conftest import scientific_slice_config, write_scientific_slice


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def brute_force_ranks(model, eval_data):
    """Per evaluation row, in loader order: the target's rank among all real items (0 = first);
    fails on tied scores, where ranking metrics depend on how a top-k breaks ties."""
    ranks = []
    model.eval()
    with torch.no_grad():
        for interaction, _, _, _ in eval_data:
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)
            scores[:, 0] = -torch.inf  # padding item, never recommended
            target = interaction[model.ITEM_ID]
            target_scores = scores[torch.arange(len(interaction)), target]
            assert torch.equal((scores > target_scores[:, None]).sum(1), (scores >= target_scores[:, None]).sum(1) - 1)
            ranks.append((scores > target_scores[:, None]).sum(dim=1))
    return torch.cat(ranks)


def ndcg_at_10(ranks):
    return float(torch.where(ranks < 10, 1.0 / torch.log2(ranks.double() + 2), 0.0).mean())


def recall_at_10(ranks):
    return float((ranks < 10).double().mean())


def test_world_size_2_trains_and_evaluates_the_whole_test_set(scientific_dir, tmp_path, in_tmp_cwd):
    # 121 users: an odd test set, so DistributedSampler pads rank 1's shard with a repeated user
    data_root = tmp_path / "data"
    write_scientific_slice(scientific_dir, data_root, n_users=121)
    # learned ID embeddings: items with identical feature rows still get distinct scores (no ties)
    # training in pieces of 16 rows: several backward passes per optimiser step under DDP
    config = scientific_slice_config(data_root, eval_batch_size=16, checkpoint_dir=str(tmp_path / "saved"),
                                     use_id_embedding=True, train_micro_batch_size=16)

    result = launch("MMSASRec", "SciSlice", nproc=2, port=free_port(), backend="gloo", config_dict=config)
    assert result is not None and result["checkpoint"]

    _, (_, valid_data, test_data), model, trainer = build("MMSASRec", "SciSlice", config_dict=config)
    assert trainer.config["single_spec"]
    single_test = trainer.evaluate(test_data, model_file=result["checkpoint"])
    single_valid = trainer.evaluate(valid_data, model_file=result["checkpoint"])
    assert result["test_result"] == pytest.approx(dict(single_test), abs=1e-4)
    assert result["best_valid_result"] == pytest.approx(dict(single_valid), abs=1e-4)

    ranks = brute_force_ranks(model, test_data)
    assert len(ranks) == 121
    assert result["test_result"]["ndcg@10"] == pytest.approx(ndcg_at_10(ranks), abs=1e-4)
    assert result["test_result"]["recall@10"] == pytest.approx(recall_at_10(ranks), abs=1e-4)
    # the check can fail: either rank's shard alone (rows r, r+2, ...) gives other numbers
    for rank in (0, 1):
        shard = ranks[rank::2]
        differences = (ndcg_at_10(shard) - ndcg_at_10(ranks), recall_at_10(shard) - recall_at_10(ranks))
        assert max(map(abs, differences)) > 1e-3


def _gather_worker(rank, port, sample_size, queue):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://localhost:{port}")
    try:
        # DistributedSampler's split of 0..sample_size-1, padded with the first indices
        padded = list(range(sample_size)) + list(range(sample_size))[: (-sample_size) % 2]
        local = torch.tensor(padded[rank::2]).repeat_interleave(3).view(-1, 3)
        gathered = gather_shards(local, sample_size, torch.device("cpu"))
        if rank == 0:
            queue.put(gathered.tolist())
    finally:
        torch.distributed.destroy_process_group()


def test_gather_shards_restores_single_process_order_without_padding():
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_gather_worker, args=(free_port(), 7, queue), nprocs=2, join=True)
    assert queue.get() == [[i, i, i] for i in range(7)]


def test_models_with_training_stages_are_refused_under_ddp(scientific_dir, tmp_path, in_tmp_cwd):
    from recbole_mm.model.mmsasrec import MMSASRec
    from recbole_mm.trainer import TrainingStage
    from recbole_mm.utils import RecboleMMError

    class StagedMMSASRec(MMSASRec):
        def training_stages(self):
            return [TrainingStage("only", epochs=1)]

        def enter_stage(self, stage):
            pass

    write_scientific_slice(scientific_dir, tmp_path / "data", n_users=20)
    config = scientific_slice_config(tmp_path / "data", checkpoint_dir=str(tmp_path / "saved"), local_rank=0,
                                     nproc=1, world_size=1, offset=0, ip="localhost", port=free_port(), backend="gloo")
    try:
        with pytest.raises(RecboleMMError, match="stages"):
            # a subclass has no properties/model yaml of its own: give it MMSASRec's
            build(StagedMMSASRec, "SciSlice", [str(PROPERTIES_DIR / "model" / "MMSASRec.yaml")], config)
        assert torch.distributed.is_initialized()  # the config really joined a process group
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
