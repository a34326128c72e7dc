"""Data parallelism on the CPU: DDP with 2 gloo processes under torchrun, and DataParallel.

- ``scripts/ddp_check.py`` under ``torchrun --nproc_per_node=2`` (gloo): sharded evaluation gives
  one process's total NLL; DDP training steps (two segments, per-rank memory) give one process's
  gradients on the concatenated batch; for txl_fast's model and a patched HF model. ~10 s.
- ``DataParallel`` on a machine without GPUs runs the module itself (no replicas). Replication, the
  part that breaks HF's TransfoXL (transformers issue 8145, "StopIteration in replica 0"), is
  exercised on the CPU by running torch's own ``replicate`` with its GPU broadcast replaced by
  clones (the clones stay in the autograd graph, as the broadcast does).
"""
import copy
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import txl_fast
from tests.helpers import config_kwargs
from txl_fast.distributed import segment_nll, shard_rows, sharded_nll

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=".*TransfoXL.*")


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "ddp_check.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    kinds = ["txl_fast", "hf_patched"]
    for kind in kinds:
        sharded, single = res[f"{kind}_eval_nll"]
        assert abs(sharded - single) <= 1e-5 * abs(single), (kind, sharded, single)
        assert res[f"{kind}_eval_count"][0] == res[f"{kind}_eval_count"][1] > 0
        for step in (0, 1):
            assert res[f"{kind}_grad_step{step}"] <= 1e-5, res
            assert res[f"{kind}_mems_step{step}"] <= 1e-6, res


def test_single_process_helpers():
    model = txl_fast.TransfoXLLMHeadModel(txl_fast.TransfoXLConfig(**config_kwargs("default"))).eval()
    data = torch.randint(0, 97, (4, 10))
    assert torch.equal(shard_rows(data, 1, 2), data[2:]) and torch.equal(shard_rows(data), data)
    with pytest.raises(ValueError, match="does not split evenly"):
        shard_rows(data, 0, 3)
    total, count = sharded_nll(model, data, 4)       # no process group: one process, the whole batch
    ref, ref_count = segment_nll(model, data, 4)
    assert total.item() == ref.item() and int(count) == int(ref_count) == 4 * (3 + 3 + 1)


def test_data_parallel_without_gpus_runs_the_module_itself():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    model = txl_fast.TransfoXLLMHeadModel(txl_fast.TransfoXLConfig(**config_kwargs("default"))).eval()
    dp = torch.nn.DataParallel(model)
    assert dp.device_ids == []                        # nothing to replicate onto: forward == module(...)
    ids = torch.randint(0, 97, (2, 6))
    assert torch.equal(dp(ids, labels=ids).losses, model(ids, labels=ids).losses)


@pytest.fixture
def cpu_replicate(monkeypatch):
    """torch.nn.parallel.replicate with the GPU broadcast replaced by clones: runs on the CPU."""
    replicate_mod = importlib.import_module("torch.nn.parallel.replicate")

    def broadcast(tensors, devices, detach=False):
        if not tensors:
            return []
        return [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices]

    monkeypatch.setattr(replicate_mod, "_broadcast_coalesced_reshape", broadcast)
    return replicate_mod.replicate


def test_replicas_of_our_model_match_one_model(cpu_replicate):
    torch.manual_seed(0)
    model = txl_fast.TransfoXLLMHeadModel(txl_fast.TransfoXLConfig(**config_kwargs("default"))).train()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 97, (4, 7))
    replicas = cpu_replicate(model, [0, 1])
    assert not list(replicas[0].parameters())        # replicas hold plain tensors: the HF failure's cause
    outs = [rep(shard_rows(ids, i, 2), labels=shard_rows(ids, i, 2)) for i, rep in enumerate(replicas)]
    ((outs[0].loss + outs[1].loss) / 2).backward()   # DataParallel: gather, then one backward to the original
    ref = reference(ids, labels=ids)
    ref.loss.backward()
    assert torch.allclose(torch.cat([o.losses for o in outs]), ref.losses, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-6, name


def test_hf_replicas_fail_as_in_issue_8145_patched_or_not(cpu_replicate):
    """Documented limitation: HF's own code calls next(self.parameters()) (init_mems, AdaptiveEmbedding),
    empty on a replica. patch() swaps attention and softmax only; the swapped classes do travel."""
    transformers = pytest.importorskip("transformers")
    model = transformers.TransfoXLLMHeadModel(transformers.TransfoXLConfig(**config_kwargs("default")))
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(StopIteration):
        cpu_replicate(model, [0])[0](ids)
    replica = cpu_replicate(txl_fast.patch(model), [0])[0]
    assert type(replica.crit).__name__ == "TxlFastPatchedProjectedAdaptiveLogSoftmax"
    with pytest.raises(StopIteration):
        replica(ids)
