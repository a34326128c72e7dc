"""Data-parallel checks, started by torchrun (gloo on the CPU, nccl on GPUs):

    torchrun --standalone --nproc_per_node=2 scripts/ddp_check.py [results.json]

1. Sharded evaluation: each rank streams its rows of a global batch (with its own memory); the
   summed NLL over ranks equals one process on the whole batch.
2. DDP training: two consecutive segments (the second with each rank's memory), the
   DistributedDataParallel gradients equal one process's on the concatenated batch, and the
   ranks' memories concatenated by rows equal the one-process memory.
   For txl_fast's TransfoXLLMHeadModel and, when transformers is installed, a patched HF one.
Rank 0 writes the largest differences as JSON (to the given path, else stdout).
"""
from __future__ import annotations

import copy
import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import txl_fast
from txl_fast.distributed import shard_rows, sharded_nll, segment_nll, world

warnings.filterwarnings("ignore")
CONFIG = dict(vocab_size=97, cutoffs=[20, 50], d_model=32, d_embed=32, n_head=4, d_head=8, d_inner=48,
              div_val=2, n_layer=2, mem_len=6, clamp_len=5, same_length=True, dropout=0.0, dropatt=0.0)
GLOBAL_BSZ, SEG_LEN = 4, 7


def build(kind: str):
    torch.manual_seed(0)            # the same weights on every rank (DDP also broadcasts rank 0's)
    if kind == "txl_fast":
        return txl_fast.TransfoXLLMHeadModel(txl_fast.TransfoXLConfig(**CONFIG))
    import transformers

    model = transformers.TransfoXLLMHeadModel(transformers.TransfoXLConfig(**CONFIG))
    with torch.no_grad():           # HF leaves some parameters uninitialised (torch.FloatTensor)
        for p in model.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    return txl_fast.patch(model)


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def train_check(kind: str, data: torch.Tensor, rank: int, world_size: int) -> dict:
    model = build(kind).train()
    single = copy.deepcopy(model)   # the one-process reference, same weights
    ddp = DistributedDataParallel(model, find_unused_parameters=True)   # a rank's rows may miss a cluster
    local = shard_rows(data)
    result = {}
    mems_ddp = mems_one = None
    for step, start in enumerate(range(0, 2 * SEG_LEN, SEG_LEN)):
        ddp.zero_grad(set_to_none=True)
        single.zero_grad(set_to_none=True)
        ids = local[:, start : start + SEG_LEN]
        out = ddp(ids, mems=mems_ddp, labels=ids.clone())
        out.loss.backward()                                       # DDP averages the gradients over ranks
        ids_all = data[:, start : start + SEG_LEN]
        ref = single(ids_all, mems=mems_one, labels=ids_all.clone())
        ref.loss.backward()
        grads = [p.grad for _, p in model.named_parameters()]
        ref_grads = [p.grad for _, p in single.named_parameters()]
        assert all(g is not None for g in grads + ref_grads)
        result[f"{kind}_grad_step{step}"] = max_diff(grads, ref_grads)
        # memories are per rank: gathered by rows they are the one-process memory
        gathered = []
        for m in out.mems:
            parts = [torch.empty_like(m) for _ in range(world_size)]
            dist.all_gather(parts, m.contiguous())
            gathered.append(torch.cat(parts, dim=1))             # (mem_len, B, d): rows are dim 1
        result[f"{kind}_mems_step{step}"] = max_diff(gathered, ref.mems)
        mems_ddp, mems_one = out.mems, ref.mems
    return result


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world_size = world()
    data = torch.randint(0, CONFIG["vocab_size"], (GLOBAL_BSZ, 3 * SEG_LEN), generator=torch.Generator().manual_seed(1))

    results = {"world_size": world_size}
    for kind in ("txl_fast", "hf_patched"):
        if kind == "hf_patched":
            try:
                import transformers  # noqa: F401
            except ImportError:
                continue
        model = build(kind).eval()
        total, count = sharded_nll(model, data, SEG_LEN)
        one_total, one_count = segment_nll(model, data, SEG_LEN)
        results[f"{kind}_eval_nll"] = [total.item(), one_total.item()]
        results[f"{kind}_eval_count"] = [int(count), int(one_count)]
        results.update(train_check(kind, data, rank, world_size))

    if rank == 0:
        text = json.dumps(results)
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w") as f:
                f.write(text)
        else:
            print(text)
    dist.barrier()              # both ranks done before either tears gloo down (a rank that left early
    dist.destroy_process_group()   # aborted the other's teardown: "terminate called", ~1 run in 10)


if __name__ == "__main__":
    main()
