"""Where the app runs: CPU, a CUDA GPU, a Hugging Face Space, or a ZeroGPU Space.

The same code serves all of them; what differs is decided here, from the environment, in plain functions that
take the environment as a mapping so they can be tested without the hardware.

ZeroGPU lends a GPU only inside functions decorated with ``spaces.GPU``, for seconds at a time: a chat
generation fits, a background trainer that runs for hours does not, so training is switched off there and the
page says why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ZERO_GPU_TRAINING_NOTICE = ("Background training is off on ZeroGPU: it lends the GPU only for short calls, and "
                            "training runs continuously. Votes are still stored (and pushed to the Hub when "
                            "configured); run the app on a CPU or dedicated GPU Space, or a GPU box, to train.")
GPU_CALL_SECONDS = 60  # the longest one generation call may hold a ZeroGPU device


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def on_spaces(environ: Mapping[str, str]) -> bool:
    """Spaces sets SPACE_ID (owner/name) in every Space."""
    return bool(environ.get("SPACE_ID"))


def on_zero_gpu(environ: Mapping[str, str]) -> bool:
    """ZeroGPU Spaces set SPACES_ZERO_GPU."""
    return _truthy(environ.get("SPACES_ZERO_GPU"))


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    on_spaces: bool
    zero_gpu: bool

    @property
    def can_train(self) -> bool:
        return not self.zero_gpu

    @property
    def training_notice(self) -> str | None:
        return ZERO_GPU_TRAINING_NOTICE if self.zero_gpu else None


def detect(environ: Mapping[str, str], cuda_available: bool) -> Hardware:
    """On ZeroGPU, CUDA looks available at start-up (the `spaces` package emulates it) and the device is cuda."""
    zero_gpu = on_zero_gpu(environ)
    return Hardware(device="cuda" if cuda_available or zero_gpu else "cpu", on_spaces=on_spaces(environ),
                    zero_gpu=zero_gpu)


NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # Linux /proc/cpuinfo names


def cpu_flags(cpuinfo: str) -> set[str]:
    """The instruction-set flags listed in a Linux /proc/cpuinfo text."""
    return {flag for line in cpuinfo.splitlines() if line.startswith("flags")
            for flag in line.partition(":")[2].split()}


@functools.cache
def native_bf16() -> bool:
    """Whether bf16 matrix products run in hardware here: a CUDA GPU that supports them, or a CPU with AVX512-BF16
    or AMX. Why it matters: without them PyTorch converts bf16 on the fly and a bf16 model is slower than fp32, so
    `--quantization auto` picks bf16 only where this is true. Not Linux (no /proc/cpuinfo): False (unmeasured)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(cpu_flags(Path("/proc/cpuinfo").read_text()) & NATIVE_BF16_CPU_FLAGS)
    except OSError:
        return False


def maybe_gpu_decorator(fn: Callable, environ: Mapping[str, str],
                        duration_s: int = GPU_CALL_SECONDS) -> Callable:
    """`spaces.GPU(fn)` on ZeroGPU when the `spaces` package is importable; `fn` unchanged everywhere else."""
    if not on_zero_gpu(environ):
        return fn
    if importlib.util.find_spec("spaces") is None:
        log.warning("SPACES_ZERO_GPU is set but the `spaces` package is not installed; generation is not wrapped")
        return fn
    spaces = importlib.import_module("spaces")
    return spaces.GPU(duration=duration_s)(fn)
