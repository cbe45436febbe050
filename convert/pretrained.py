"""Load what the trainer wrote (OUT/) back into PyTorch: StreamingLM or MedusaLM."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ss_mlx.config import CONFIG_KEY, MEDUSA_FILE, MEDUSA_KEY, STREAMS_FILE

from .medusa import MedusaLM
from .modeling import StreamingLM
from .save_model import PEFT_FILES


def load_trained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StreamingLM | MedusaLM:
    """The base (+ unmerged peft LoRA if any) with its streams or Medusa heads, in eval mode."""
    import transformers

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    # transformers itself loads adapter_config.json + adapter_model.safetensors found next to
    # config.json (its peft integration); wrap with peft only when it did not.
    if (path / PEFT_FILES[1]).is_file() and not getattr(base, "_hf_peft_config_loaded", False):
        import peft

        base = peft.PeftModel.from_pretrained(base, path)
    if CONFIG_KEY in config:
        model = StreamingLM(base, config[CONFIG_KEY])
        model.load_ss_state_dict(load_file(str(path / STREAMS_FILE)))
    elif MEDUSA_KEY in config:
        model = MedusaLM(base, config[MEDUSA_KEY]["num_heads"])
        model.load_heads_state_dict(load_file(str(path / MEDUSA_FILE)))
    else:
        raise ValueError(
            f"{path}/config.json has neither {CONFIG_KEY!r} nor {MEDUSA_KEY!r}"
        )
    return model.to(device).eval()
