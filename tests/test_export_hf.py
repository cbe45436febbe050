"""`ss-mlx export-hf`: LoRA-merged, optionally truncated plain HF dirs (paper-comparison refs)."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

# isort: off
import ss_mlx  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

# isort: on
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hf_tiny import make_ss_checkpoint, peft_merged_state  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from ss_mlx_convert.export import ConversionError  # noqa: E402
from ss_mlx_convert.export_hf import export_hf, main  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def lora_src(tmp_path_factory):
    return make_ss_checkpoint(tmp_path_factory.mktemp("src") / "m", "llama", seed=5,
                              lora=dict(target_modules=["q_proj", "v_proj", "down_proj"]))


def test_merged_export_equals_peft_merge_and_loads_everywhere(lora_src, tmp_path):
    import transformers
    from mlx_lm import load

    out = export_hf(lora_src, tmp_path / "plain")
    config = json.loads((out / "config.json").read_text())
    assert "speculative_streaming" not in config and "ss_training" not in config
    assert not (out / "adapter_config.json").exists()
    assert not (out / "speculative_streams.safetensors").exists()
    want = peft_merged_state(lora_src)
    got = load_file(str(out / "model.safetensors"))
    # A tied head is stored once (as the embedding), like the source checkpoint does.
    assert set(got) <= set(want) and set(want) - set(got) <= {"lm_head.weight"}
    assert any(k.startswith("model.layers.1.") for k in got)
    for k, v in got.items():
        np.testing.assert_allclose(v, want[k], rtol=0, atol=1e-6)

    # The merged dir computes what the peft model computes, in transformers and in mlx-lm.
    ids = [[1, 5, 9, 3, 7]]
    ref = transformers.AutoModelForCausalLM.from_pretrained(lora_src, dtype=torch.float32)
    if not getattr(ref, "_hf_peft_config_loaded", False):
        import peft

        ref = peft.PeftModel.from_pretrained(ref, lora_src)
    with torch.no_grad():
        want_logits = ref(torch.tensor(ids)).logits.numpy()
    model, _ = load(str(out))
    got_logits = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4)


def test_truncated_export_keeps_first_layers(lora_src, tmp_path):
    from mlx_lm import load

    out = export_hf(lora_src, tmp_path / "draft", layers=1)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    names = load_file(str(out / "model.safetensors"))
    assert any(n.startswith("model.layers.0.") for n in names)
    assert not any(n.startswith("model.layers.1.") for n in names)
    assert "model.norm.weight" in names and "model.embed_tokens.weight" in names
    model, _ = load(str(out))
    assert len(model.layers) == 1
    assert model(mx.array([[1, 2, 3]])).shape[:2] == (1, 3)


def test_bad_layers_and_occupied_out_fail_cleanly(lora_src, tmp_path):
    with pytest.raises(ConversionError, match="--layers must be in"):
        export_hf(lora_src, tmp_path / "x", layers=99)
    assert not (tmp_path / "x").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("keep")
    with pytest.raises(SystemExit, match="not empty"):
        main(["--torch", str(lora_src), "--out", str(tmp_path / "busy")])
    assert (tmp_path / "busy" / "f").read_text() == "keep"
    with pytest.raises(ConversionError, match="no config.json"):
        export_hf(tmp_path / "busy", tmp_path / "y")
