"""Where the app runs, decided from explicit environments (no GPU needed)."""

import sys
import types

from rlhf_online.hardware import (NATIVE_BF16_CPU_FLAGS, ZERO_GPU_TRAINING_NOTICE, cpu_flags, detect,
                                  maybe_gpu_decorator, on_spaces, on_zero_gpu)


def test_plain_cpu_box():
    hardware = detect({}, cuda_available=False)
    assert (hardware.device, hardware.on_spaces, hardware.zero_gpu) == ("cpu", False, False)
    assert hardware.can_train and hardware.training_notice is None


def test_gpu_box_uses_cuda_and_trains():
    hardware = detect({}, cuda_available=True)
    assert hardware.device == "cuda" and hardware.can_train


def test_cpu_space():
    hardware = detect({"SPACE_ID": "someone/rlhf"}, cuda_available=False)
    assert hardware.on_spaces and not hardware.zero_gpu and hardware.can_train


def test_zero_gpu_space_disables_training_and_says_why():
    environ = {"SPACE_ID": "someone/rlhf", "SPACES_ZERO_GPU": "true"}
    hardware = detect(environ, cuda_available=False)
    assert on_spaces(environ) and on_zero_gpu(environ)
    assert hardware.device == "cuda" and not hardware.can_train
    assert hardware.training_notice == ZERO_GPU_TRAINING_NOTICE and "ZeroGPU" in hardware.training_notice
    assert not on_zero_gpu({"SPACES_ZERO_GPU": "0"})


def test_gpu_decorator_only_on_zero_gpu_with_the_spaces_package(monkeypatch):
    def generate():
        return "answer"

    assert maybe_gpu_decorator(generate, {}) is generate
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    assert maybe_gpu_decorator(generate, {"SPACES_ZERO_GPU": "1"}) is generate  # package missing: unchanged

    calls = []
    fake_spaces = types.ModuleType("spaces")
    fake_spaces.__spec__ = types.SimpleNamespace(name="spaces", loader=None, submodule_search_locations=None,
                                                 parent="", has_location=False, origin=None, cached=None)

    def gpu(duration):
        def wrap(fn):
            def wrapped(*args, **kwargs):
                calls.append(duration)
                return fn(*args, **kwargs)
            return wrapped
        return wrap

    fake_spaces.GPU = gpu
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces)
    wrapped = maybe_gpu_decorator(generate, {"SPACES_ZERO_GPU": "1"}, duration_s=30)
    assert wrapped is not generate and wrapped() == "answer" and calls == [30]


def test_cpu_flags_tell_native_bf16_cpus_from_the_others():
    """What `--quantization auto` asks of /proc/cpuinfo: this machine's AMD EPYC lists avx512_bf16; an Ice Lake
    Xeon lists avx512f alone (bf16 emulated, slower than fp32 there)."""
    epyc = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n"
    ice_lake = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
    assert cpu_flags(epyc) & NATIVE_BF16_CPU_FLAGS == {"avx512_bf16"}
    assert not cpu_flags(ice_lake) & NATIVE_BF16_CPU_FLAGS
    assert not cpu_flags("")
