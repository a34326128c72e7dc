"""Stage 1 of the GPU check: the environment (GPU, SMs, clocks, versions) and the ceilings measured
here (device copy bandwidth, bf16 and fp32 matrix rates, TF32 off) that every timing is set against."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

from txl_fast.bench.gpu.common import bench_ms


def environment(device, smoke: bool) -> dict:
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False           # references and fp32 rates in true fp32
    torch.backends.cudnn.allow_tf32 = False
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "device": str(device), "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        try:
            q = "clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,driver_version"
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def ceilings(device, smoke: bool) -> dict:
    """Measured: device-to-device copy (bytes read + written per second), bf16 and fp32 matrix rates."""
    n_copy = 2**20 if smoke else 2**30                     # bytes per buffer (1 GiB on the GPU)
    src = torch.randn(n_copy // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), smoke)
    out = {"copy_bytes_per_s": 2 * n_copy / (copy_ms * 1e-3)}
    for dtype, key, n in ((torch.bfloat16, "matmul_bf16_flops", 8192), (torch.float32, "matmul_fp32_flops", 8192)):
        n = 128 if smoke else n
        if smoke and dtype == torch.bfloat16:
            dtype = torch.float32                          # the CPU's bf16 matmul is no ceiling of anything here
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        out[key] = 2 * n**3 / (bench_ms(lambda: a @ b, smoke) * 1e-3)
    return {"copy_tb_per_s": round(out["copy_bytes_per_s"] / 1e12, 3),
            "bf16_tflops": round(out["matmul_bf16_flops"] / 1e12, 1),
            "fp32_tflops": round(out["matmul_fp32_flops"] / 1e12, 2), "values": out}
