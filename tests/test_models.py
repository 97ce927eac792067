"""Base models and the adapter artifact: build, hash, save, load back bit-exact, refuse a changed base."""

from pathlib import Path

import pytest
import torch

from tuneloop.models import (
    BaseModelError,
    load_adapter_model,
    load_base,
    read_base_ref,
    resolve_base,
    save_adapter_artifact,
    weights_sha256,
)


@pytest.fixture(scope="module")
def tiny(models_dir: Path):
    return resolve_base("builtin:tiny-llama", models_dir)


def test_builtin_is_built_once_and_hashed(tiny, models_dir: Path) -> None:
    again = resolve_base("builtin:tiny-llama", models_dir)
    assert again == tiny and len(tiny.sha256) == 64
    assert not list(models_dir.glob("*.partial"))


def test_unknown_builtin_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="Unknown builtin"):
        resolve_base("builtin:nope", tmp_path)
    with pytest.raises(BaseModelError, match="is not a model folder"):
        resolve_base(str(tmp_path / "missing"), tmp_path)


def test_tiny_tokenizer_has_a_chat_template(tiny) -> None:
    _, tok = load_base(tiny)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert ids.endswith("<|im_start|>assistant\n")


def test_adapter_round_trip_is_bit_exact(tiny, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = load_base(tiny)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        before = peft_model(ids).logits
    save_adapter_artifact(peft_model, tok, tiny, tmp_path / "artifact")
    loaded, _ = load_adapter_model(tmp_path / "artifact")
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
    assert read_base_ref(tmp_path / "artifact") == tiny


def test_changed_base_is_refused(tiny, tmp_path: Path) -> None:
    import shutil

    from tuneloop.models import BaseRef

    copy = tmp_path / "base"
    shutil.copytree(tiny.location, copy)
    ref = BaseRef(str(copy), weights_sha256(copy))
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(BaseModelError, match="changed since the adapter was trained"):
        load_base(ref)


def test_unloadable_base_names_the_location_and_why(tiny, tmp_path: Path) -> None:
    import shutil

    from tuneloop.models import BaseRef

    broken = tmp_path / "truncated"
    shutil.copytree(tiny.location, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut off mid-file
    with pytest.raises(BaseModelError, match=f"Base model '{broken}' cannot be loaded: .*header"):
        load_base(BaseRef(str(broken), weights_sha256(broken)))
    bad_config = tmp_path / "bad-config"
    shutil.copytree(tiny.location, bad_config)
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(BaseModelError, match=f"Base model '{bad_config}' cannot be loaded: .*config.json"):
        load_base(BaseRef(str(bad_config), weights_sha256(bad_config)))


def test_unreachable_hub_id_names_the_id() -> None:
    from tuneloop.models import BaseRef

    # The real failure on these machines: no hub (conftest sets HF_HUB_OFFLINE=1).
    with pytest.raises(BaseModelError, match="Base model 'someorg/no-such-model' cannot be loaded"):
        load_base(BaseRef("someorg/no-such-model", "", "main"))
