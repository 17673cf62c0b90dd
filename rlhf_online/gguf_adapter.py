"""Converting a published PEFT LoRA adapter into a llama.cpp GGUF LoRA adapter, with the `gguf` package only.

The PEFT folder stays the canonical artefact (the trainer and `PeftModel.from_pretrained` load it); the GGUF
file beside it (`adapter_model.gguf`) is what the llama.cpp engine serves. llama.cpp's own converter
(`convert_lora_to_gguf.py`) is a script inside its source tree, not a package, and it needs the base model's
Hugging Face folder; what it does for a LoRA on a Llama-family model is small, so it is written here:

* tensors are renamed to llama.cpp's names (`blk.N.attn_q.weight.lora_a` (r x in), `.lora_b` (out x r));
* llama.cpp stores the q and k projections with the rows of each attention head permuted for its rotary
  embedding (the permutation its HF -> GGUF conversion applies to `q_proj`/`k_proj`), so the rows of the q and
  k `lora_b` (the output side) get the same permutation; `lora_a` (the input side) is unchanged. Without it
  the adapter changes the wrong rows: its effect correlates ~0.7 with PyTorch's instead of ~0.96;
* `adapter.lora.alpha` carries the scale: llama.cpp multiplies by alpha / r like PEFT.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

GGUF_ADAPTER_FILE = "adapter_model.gguf"

# PEFT/transformers module name -> llama.cpp tensor name (gguf.TENSOR_NAMES for the Llama architecture)
MODULE_TO_GGUF = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}
LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
ROTARY_ARCHITECTURES = {"llama", "mistral", "granite"}  # llama.cpp permutes q/k rows for these


class AdapterConversionError(ValueError):
    pass


@dataclass(frozen=True)
class BaseShape:
    """What the conversion needs to know about the base model."""

    architecture: str  # llama.cpp's name, e.g. "llama"
    n_head: int
    n_head_kv: int

    @classmethod
    def from_hf_config(cls, config) -> "BaseShape":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        model_type = get("model_type", "llama")
        n_head = get("num_attention_heads")
        return cls(architecture="llama" if model_type in ("llama", "smollm", "smollm2") else model_type,
                   n_head=n_head, n_head_kv=get("num_key_value_heads") or n_head)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "BaseShape":
        import gguf

        reader = gguf.GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
        n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
        kv = reader.fields.get(f"{arch}.attention.head_count_kv")
        return cls(architecture=arch, n_head=n_head, n_head_kv=int(kv.contents()) if kv is not None else n_head)


def rotary_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` of q/k weight rows: within each head, interleave the two rotary halves.

    HF stores a head's rotary dims as [x0..x(d/2-1), y0..y(d/2-1)]; llama.cpp as [x0, y0, x1, y1, ...].
    """
    out_features = rows.shape[0]
    return (rows.reshape(n_head, 2, out_features // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def gguf_lora_tensors(weights: dict[str, torch.Tensor], base: BaseShape,
                      permute_rotary: bool = True) -> dict[str, np.ndarray]:
    """PEFT state dict -> {llama.cpp tensor name: float32 array}. `permute_rotary=False` exists for the test that
    proves the permutation matters."""
    tensors = {}
    for key, tensor in weights.items():
        match = LORA_KEY.search(key)
        if match is None:
            raise AdapterConversionError(f"unsupported adapter tensor {key!r} (only LoRA A/B of linear layers)")
        layer, module, side = match.groups()
        if module not in MODULE_TO_GGUF:
            raise AdapterConversionError(f"no llama.cpp tensor for module {module!r}")
        value = tensor.detach().to(torch.float32)
        if side == "B" and permute_rotary and base.architecture in ROTARY_ARCHITECTURES:
            if module == "q_proj":
                value = rotary_permute(value, base.n_head)
            elif module == "k_proj":
                value = rotary_permute(value, base.n_head_kv)
        name = f"blk.{layer}.{MODULE_TO_GGUF[module]}.weight.lora_{side.lower()}"
        tensors[name] = value.contiguous().numpy()
    return tensors


@contextlib.contextmanager
def atomic_gguf_writer(out_path: Path, architecture: str):
    """A `gguf.GGUFWriter` for `out_path` that writes a temp file and renames it into place when the block
    ends, so a reader never sees half a file; a crash or a full disk leaves no file at all."""
    import gguf

    out_path = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".tmp-", dir=out_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, architecture)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_gguf_adapter(weights: dict[str, torch.Tensor], lora_alpha: float, base: BaseShape, out_path: Path,
                       permute_rotary: bool = True) -> Path:
    """Write the GGUF adapter atomically (temp file + rename), so a reader never sees half a file."""
    import gguf

    tensors = gguf_lora_tensors(weights, base, permute_rotary)
    with atomic_gguf_writer(out_path, base.architecture) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_alpha))
        for name, array in tensors.items():
            writer.add_tensor(name, array)
    return Path(out_path)


def convert_peft_folder(folder: str | Path, base: BaseShape, out_path: str | Path | None = None,
                        permute_rotary: bool = True) -> Path:
    """`folder/adapter_model.safetensors` + `adapter_config.json` -> `folder/adapter_model.gguf` (or out_path)."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise AdapterConversionError("rsLoRA and DoRA adapters have no llama.cpp equivalent")
    if config.get("bias", "none") != "none":
        raise AdapterConversionError("LoRA bias terms have no llama.cpp equivalent")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return write_gguf_adapter(weights, config["lora_alpha"], base, Path(out_path or folder / GGUF_ADAPTER_FILE),
                              permute_rotary)
