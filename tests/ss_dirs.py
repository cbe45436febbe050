"""Tiny SS model directories on disk, built the way a user builds one (`ss-mlx init`)."""

from pathlib import Path

from conftest import save_tiny_model_dir, tiny_base

from ss_mlx.cli import main as ss_cli


def make_ss_dir(
    root: Path, vocab_size: int = 99, seed: int = 3, *init_args: str, model_type: str = "llama"
) -> Path:
    """A tiny base saved under root/base, with 2 fresh streams on 2 layers in root/ss.

    vocab_size 99 = the test tokenizer's tokens, so generated ids re-tokenize to themselves.
    """
    save_tiny_model_dir(tiny_base(model_type, seed=seed, vocab_size=vocab_size), root / "base")
    out = root / "ss"
    ss_cli(["init", "--model", str(root / "base"), "--out", str(out), "--streams", "2",
            "--stream-layers", "2", *init_args])  # fmt: skip
    return out
