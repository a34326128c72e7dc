"""Every shape, time budget and error limit of the GPU check (``scripts/gpu_check.py``), in one table:
``SHAPES["gpu"]`` on the device, ``SHAPES["smoke"]`` in the CPU rehearsal (``--cpu-smoke``)."""
from __future__ import annotations

# attention cases: (name, B, Lq, mlen, H, D, window, Lr): Lk = mlen + Lq, Lr None = Lk (unclamped)
WT103 = dict(vocab_size=267735, cutoffs=[20000, 40000, 200000], div_val=4, d_model=1024, d_embed=1024, n_head=16,
             d_head=64, d_inner=4096, n_layer=18, mem_len=1600, clamp_len=1000, same_length=True, dropout=0.0)
SHAPES = {
    "gpu": dict(
        attention=[("odd 37x53 D48", 2, 37, 16, 3, 48, None, None),
                   ("wt103 eval, window, clamped r", 1, 128, 1600, 16, 64, 1600, 1001),
                   ("window 0", 2, 33, 20, 4, 64, 0, None),
                   ("decode Lq1", 4, 1, 1600, 16, 64, 1600, 1001),
                   ("decode Lq5", 4, 5, 300, 16, 64, 300, None),
                   ("D16", 2, 65, 70, 4, 16, 50, None),
                   ("D128", 2, 65, 70, 4, 128, None, 40)],
        dtypes=["float32", "float16", "bfloat16"],
        softmax=dict(vocab=267735, cutoffs=[20000, 40000, 200000], div_val=4, d_proj=1024, d_embed=1024, n=256),
        softmax_dtypes=["float32", "bfloat16"],
        topk=[1, 5],
        graph_model=dict(WT103, vocab_size=30000, cutoffs=[2000, 10000], n_layer=4, d_model=256, d_embed=256,
                         n_head=4, d_inner=512, mem_len=48, clamp_len=40),
        graph_tokens=80,
        bench_attention=dict(batches=[1, 8, 32], tgt=128, mem=1600, H=16, D=64, clamp=1000, dtype="float16"),
        bench_decode=dict(batches=[1, 32], mem=1600, H=16, D=64, dtype="float16"),
        bench_softmax=dict(rows=[128, 4096], dtype="float16"),
        model=WT103,
        bench_host=dict(prompt=16, tokens=96, dtype="float16"),
        bench_eval=dict(batches=[1, 32], segments={1: 8, 32: 4}, dtypes=["float16", "bfloat16"]),
        # bidirectional (Conformer) cases: (name, B, Lq, mlen, H, D, context); lengths ragged per batch row
        bidirectional=[("conformer 400", 8, 400, 0, 4, 64, None), ("limited context, memory", 4, 64, 32, 8, 64, (16, 4))],
        bench_bidirectional=[dict(B=8, L=400, H=4, D=64, dtype="float16"), dict(B=8, L=1500, H=8, D=64, dtype="float16")],
        # Parakeet / FastConformer (stage 5): 8 heads of 128, 80 ms frames (375 = 30 s, 45,000 = an hour);
        # checks: bidirectional cases as above; HF's route where its predicted peak <= memory_share x free;
        # FlexAttention below flex_max_elements scores (int32 indexing) and while reserve_s is left
        parakeet=dict(checks=[("parakeet B2 T1000 D128", 2, 1000, 0, 8, 128, None)],
                      check_dtypes=["float32", "bfloat16"], B=1, H=8, D=128,
                      frames=[375, 1500, 7500, 15000, 45000], dtypes=["bfloat16", "float32"],
                      flex_dtypes=["bfloat16"], memory_share=0.9, memory_cap=None, flex_max_elements=2**31,
                      chunk_bytes=2**30, reserve_s=30),
        compile_workers=8,
    ),
    "smoke": dict(
        attention=[("odd 7x12 D12", 2, 7, 5, 2, 12, None, None),
                   ("window, clamped r", 1, 9, 12, 2, 16, 12, 8),
                   ("window 0", 1, 5, 3, 2, 16, 0, None),
                   ("decode Lq1", 2, 1, 20, 2, 16, 20, 12)],
        dtypes=["float32", "float16", "bfloat16"],
        softmax=dict(vocab=300, cutoffs=[50, 100, 200], div_val=2, d_proj=32, d_embed=32, n=24),
        softmax_dtypes=["float32"],
        topk=[1, 5],
        graph_model=dict(WT103, vocab_size=97, cutoffs=[20, 50], n_layer=2, d_model=32, d_embed=32, n_head=4,
                         d_head=8, d_inner=48, div_val=2, mem_len=6, clamp_len=5),
        graph_tokens=6,
        bench_attention=dict(batches=[1], tgt=8, mem=16, H=2, D=16, clamp=12, dtype="float16"),
        bench_decode=dict(batches=[1], mem=16, H=2, D=16, dtype="float16"),
        bench_softmax=dict(rows=[16], dtype="float32"),
        model=dict(WT103, vocab_size=97, cutoffs=[20, 50], n_layer=2, d_model=32, d_embed=32, n_head=4, d_head=8,
                   d_inner=48, div_val=2, mem_len=12, clamp_len=10),
        bench_host=dict(prompt=4, tokens=3, dtype="float32"),
        bench_eval=dict(batches=[1], segments={1: 2}, dtypes=["float32"], tgt=8),
        bidirectional=[("conformer 13", 3, 13, 0, 2, 8, None), ("limited context, memory", 2, 6, 4, 2, 8, (3, 1))],
        bench_bidirectional=[dict(B=2, L=12, H=2, D=8, dtype="float32")],
        # the caps make the last length rehearse both skips (HF's route over memory, flex over elements)
        parakeet=dict(checks=[("parakeet B2 T13 D128", 2, 13, 0, 2, 128, None)],
                      check_dtypes=["float32", "bfloat16"], B=1, H=2, D=128, frames=[12, 24], dtypes=["float32"],
                      flex_dtypes=["float32"], memory_share=0.9, memory_cap=10000, flex_max_elements=1000,
                      chunk_bytes=2048, reserve_s=0),
        compile_workers=2,
        warm_cases=2,
    ),
}
BUDGET_S = {"gpu": {"environment": 40, "compile": 100, "correctness": 130, "timings": 140, "parakeet": 85},
            "smoke": {"environment": 20, "compile": 60, "correctness": 120, "timings": 60, "parakeet": 60}}
TOTAL_S = {"gpu": 495, "smoke": 360}      # no record starts later (the device command's limit is 540 s)
# relative Frobenius error against float64: (output, gradients); low precision also <= 2x the torch path's
LIMITS = {"float32": (1e-5, 3e-5), "float16": (1e-2, 1e-2), "bfloat16": (2e-2, 2e-2)}
BIDIRECTIONAL_DTYPES = ("float32", "bfloat16")
DR_REPEAT = 1e-6                    # dr is accumulated with atomics: bitwise repeatability is not promised
# NVIDIA's published Transformer-XL (PyTorch) wt103 inference figure on an A100, FP16, TorchScript,
# tokens/s by batch size, as quoted in issue 15: published, not measured here
PUBLISHED_A100 = {1: 11068, 32: 32162}
