"""Load what the trainer wrote (OUT/) back into PyTorch: StreamingLM or MedusaLM."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

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


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _why(e: BaseException) -> str:
    """One line for a transformers load failure (its messages run over many lines)."""
    chain, cur = [], e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if any(isinstance(x, pickle.UnpicklingError) for x in chain):
        return (
            "a weight file holds objects other than tensors (a pickle that could run code); "
            "it was refused and nothing in it was run"
        )
    return f"{type(e).__name__}: {_first_line(e)}"


def _fail(model_dir: str | Path, command: str, why: str) -> SystemExit:
    return SystemExit(f"ss-mlx {command}: error: --model {model_dir}: {why}")


def load_hf_tokenizer(model_dir: str | Path, command: str) -> Any:
    """The tokenizer of an HF model directory, for `ss-mlx train` / `distill`.

    Any failure exits with one line naming --model and what is wrong, not transformers'
    multi-line advice or a traceback (also a config.json that is no JSON object).
    """
    import transformers

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise _fail(model_dir, command, "no such model directory")
    cfg = path / "config.json"
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(model_dir, command, "no config.json; is it a model directory?") from None
    except (OSError, ValueError) as e:
        raise _fail(model_dir, command, f"{cfg} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(config, dict):
        raise _fail(model_dir, command,
                    f"{cfg} must hold a JSON object, got a {type(config).__name__}")
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types, with long advice
        raise _fail(model_dir, command, f"cannot load its tokenizer ({_why(e)})") from None


def load_hf_model(model_dir: str | Path, dtype: torch.dtype, command: str) -> Any:
    """The causal LM of an HF model directory (errors as in `load_hf_tokenizer`)."""
    import transformers

    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            Path(model_dir).expanduser(), dtype=dtype
        )
    except Exception as e:
        raise _fail(model_dir, command, f"cannot load its weights ({_why(e)})") from None
