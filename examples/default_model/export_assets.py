# ruff: noqa: I001
"""Copy a converted model's stream parameters into the package (fp16) as the default streams.

    python examples/default_model/export_assets.py --model RUN-mlx --out ss_mlx/assets
"""

import argparse
import json
from pathlib import Path

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
from ss_mlx.config import CONFIG_KEY, STREAMS_FILE
from ss_mlx.prepare.default_model import STREAMS_ASSET, STREAMS_CONFIG_ASSET
from ss_mlx.decode.tree import TreeSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="converted MLX SS model directory")
    p.add_argument("--out", default="ss_mlx/assets")
    p.add_argument("--tree", default=None, help="default tree to record in the config block")
    args = p.parse_args()
    src, out = Path(args.model), Path(args.out)
    block = json.loads((src / "config.json").read_text())[CONFIG_KEY]
    if args.tree:
        block["tree"] = TreeSpec.parse(args.tree).to_dict()
    # Weights in fp16; integer tensors (the draft vocabulary's ids) stay as they are.
    tensors = {k: v.astype(mx.float16) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in mx.load(str(src / STREAMS_FILE)).items()}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (STREAMS_ASSET + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), tensors, metadata={"format": "mlx"})
    tmp.replace(out / STREAMS_ASSET)
    (out / (STREAMS_CONFIG_ASSET + ".tmp")).write_text(json.dumps(block, indent=2) + "\n")
    (out / (STREAMS_CONFIG_ASSET + ".tmp")).replace(out / STREAMS_CONFIG_ASSET)
    n = sum(v.size for v in tensors.values() if mx.issubdtype(v.dtype, mx.floating))
    print(f"wrote {out / STREAMS_ASSET} ({n:,} parameters, fp16) and {STREAMS_CONFIG_ASSET}")


if __name__ == "__main__":
    main()
