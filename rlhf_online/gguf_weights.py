"""The base GGUF that the llama.cpp engines load: the shipped file, or its 4-bit weights re-stored as Q8_0.

Why re-store: llama.cpp's fast CPU matrix kernels (llamafile's sgemm for prompts and batched decoding, the
repacked AVX2 layouts) take Q8_0 and Q4_0 blocks but not Q4_1, the format the embedded SmolLM2 ships in.
Measured with xllamacpp on one core of this 2-core machine (`bench/gguf_weights.py`): first token of a
40-token prompt 0.22 -> 0.15 s, 16 rows decoding at once 89 -> 117 tok/s.

Why this is not the re-quantization the project rejected (Q4_1 -> NF4 made answers loop): a Q4_1 block holds at
most 16 distinct values, d * q + m; Q8_0 stores each of them with 255 levels per block, so every weight moves by
at most half a Q8_0 step plus the rounding of its fp16 scale: 0.43 % of its block's largest magnitude, 0.054 of
one Q4_1 step (measured on every tensor, tests/test_gguf_weights.py). The per-token KL
between the served model and the PyTorch training copy (the dequantized Q4_1 weights) stays at the level of
llama.cpp's own arithmetic (0.0026 vs 0.0021 nats as shipped). Tensors of every other type are copied as they
are, so a GGUF without Q4_1 tensors is served unchanged.

Hand-written because no library converts between GGUF block types in place: llama.cpp's `llama-quantize` is a
compiled tool (not in the xllamacpp wheel); the `gguf` package has the (de)quantizers and the writer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlhf_online.config import ENGINE_WEIGHTS, AppConfig
from rlhf_online.gguf_adapter import atomic_gguf_writer
from rlhf_online.models import gguf_model_file

log = logging.getLogger(__name__)

RESTORED_TYPES = ("Q4_1",)  # block types llama.cpp's fast CPU kernels skip; only Q4_1 is measured here


def engine_gguf(cfg: AppConfig) -> Path:
    """The GGUF the configured model's llama.cpp engines load (`cfg.serve.engine_weights` decides)."""
    gguf = gguf_model_file(cfg.model)
    if gguf is None:
        raise ValueError(f"--model {cfg.model.model!r} is not a GGUF file")
    return served_gguf(gguf, cfg.serve.engine_weights, cfg.model.cache_dir)


def served_gguf(gguf: Path, weights: str, cache_dir: str | Path) -> Path:
    """The GGUF file to load: `gguf` itself ('shipped', or nothing to re-store), else a cached Q8_0 copy."""
    if weights not in ENGINE_WEIGHTS:
        raise ValueError(f"--engine-weights {weights!r}: choose one of {', '.join(ENGINE_WEIGHTS)}")
    if weights == "shipped":
        return gguf
    stat = gguf.stat()  # the cache key follows the source file, so a replaced GGUF is converted again
    cached = Path(cache_dir).expanduser() / f"{gguf.stem}.{stat.st_size}-{int(stat.st_mtime)}.{weights}.gguf"
    if cached.is_file():
        return cached
    try:
        if not _has_restorable_tensors(gguf):
            return gguf
        log.info("re-storing %s's %s weights as Q8_0 once, into %s", gguf.name, "/".join(RESTORED_TYPES), cached)
        restore_as_q8_0(gguf, cached)
    except (OSError, ValueError, KeyError) as exc:  # a truncated or foreign file, a full disk
        raise RuntimeError(f"could not re-store {gguf} as Q8_0 ({type(exc).__name__}: {exc}); check the file, "
                           "or start with --engine-weights shipped") from exc
    return cached


def _has_restorable_tensors(gguf: Path) -> bool:
    import gguf as gguf_lib

    reader = gguf_lib.GGUFReader(gguf)
    return any(t.tensor_type.name in RESTORED_TYPES for t in reader.tensors)


def restore_as_q8_0(source: Path, out: Path) -> int:
    """Write `source` to `out` with its Q4_1 tensors re-stored as Q8_0 (metadata and other tensors as they
    are); atomic, so a crash or a full disk leaves no half file. Returns the number of tensors re-stored."""
    import gguf as gguf_lib
    from gguf.quants import dequantize, quantize

    types = gguf_lib.GGMLQuantizationType
    reader = gguf_lib.GGUFReader(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    restored = 0
    architecture = reader.fields[gguf_lib.Keys.General.ARCHITECTURE].contents()
    with atomic_gguf_writer(out, architecture) as writer:
        for field in reader.fields.values():
            if field.name == gguf_lib.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer adds these itself
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf_lib.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        for tensor in reader.tensors:
            data, kind = tensor.data, tensor.tensor_type
            if kind.name in RESTORED_TYPES:
                data, kind = quantize(dequantize(data, kind), types.Q8_0), types.Q8_0
                restored += 1
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=kind)
    return restored
