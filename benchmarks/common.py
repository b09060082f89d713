"""What every benchmark shares: hardware ceilings measured in the same run, run metadata, result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from pdserve.common.switches import effective as effective_switches

RESULTS = Path(__file__).resolve().parent / "results"

LLAMA31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}


#: The cross-host stand-in: NCCL without peer-to-peer and shared-memory transports uses its socket
#: transport even between two GPUs of one host (set before the first communicator is made).
SOCKET_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}


def write_model_dir(directory: Path, config: dict[str, Any]) -> Path:
    """A model directory with ``config`` and the byte tokenizer (benchmarks feed token ids and use
    ``load_format="dummy"``, so no weights are written)."""
    from pdserve.engine.byte_tokenizer import write_byte_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_byte_tokenizer(directory)
    return directory


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PDSERVE_COMMIT", "unknown")


def run_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": os.environ.get("PDSERVE_COMMIT") or git_commit(),
        "python": platform.python_version(), "torch": torch.__version__,
    }
    switches = {k: v for k, v in sorted(os.environ.items()) if k.startswith("PDSERVE_") and k != "PDSERVE_COMMIT"
                and not any(word in k for word in ("KEY", "TOKEN", "SECRET", "PASSWORD"))}  # never a credential
    if switches:  # the engine's A/B switches (PDSERVE_FILL_GRAPH_PADDING=0, ...): a result says which side it measured
        info["switches"] = switches
    info["switch_values"] = effective_switches()  # every switch, defaults included (pdserve.common.switches)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"device": torch.cuda.get_device_name(0), "num_gpus": torch.cuda.device_count(),
                 "sms": props.multi_processor_count, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        info["device"] = "cpu"
    return info


def device_slug(info: dict[str, Any]) -> str:
    name = str(info.get("device", "cpu")).lower().replace("nvidia ", "").split()[0]
    return f"{name}x{info['num_gpus']}" if info.get("num_gpus", 1) > 1 else name


def _median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: int = 0) -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written, 4 GiB buffers) and a bf16 8192^3 matrix
    product on random data: the ceilings every figure of the run is compared against."""
    with torch.cuda.device(device):
        copy_gbs = _copy_bandwidth(2**30)  # 1 Gi float32 = 4 GiB each way
        tflops = _matmul_rate(8192)
        torch.cuda.empty_cache()
    return {"copy_gb_per_s": round(copy_gbs, 1), "bf16_matmul_tflops": round(tflops, 1)}


def _copy_bandwidth(numel: int) -> float:
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = _median_ms(lambda: dst.copy_(src), 20)
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def _matmul_rate(n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ms = _median_ms(lambda: a @ b, 20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def write_results(name: str, info: dict[str, Any], payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{device_slug(info)}"
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    json_path.write_text(json.dumps({"run": info, **payload}, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
