"""Healing (issue 11): distillation after removal lowers held-out KL, is deterministic and undoable, never
sees held-out samples, trains only decoder layers (vision parts bit-identical), saves a plain checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from skipit.compressor.certificate import CertifyPolicy
from skipit.compressor.heal import HealConfig, layers_to_train
from skipit.pipeline import CompressOptions, DataOptions, compress

LLAMA, LLAVA = "LlamaForCausalLM", "LlavaForConditionalGeneration"
HEAL = HealConfig(steps=30, lr=1e-3)


def _options(**kw: Any) -> CompressOptions:
    return CompressOptions(data=DataOptions(limit=40, batch_size=4, max_length=40),
                           policy=CertifyPolicy(max_kl=None, max_layers=1, probe_width=1), **kw)


def _tensors(model_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def healed_llama(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Any:
    heal_file = tmp_path_factory.mktemp("heal-data") / "more.jsonl"
    heal_file.write_text("".join(json.dumps({"text": f"Extra healing text number {i}, about rivers and hills."}) + "\n"
                                 for i in range(5)))
    out = tmp_path_factory.mktemp("healed") / "out"
    return compress(tiny_model_dir(LLAMA), out, _options(heal=HEAL, heal_data=heal_file))


def test_healing_lowers_held_out_kl_of_the_certified_set(healed_llama: Any) -> None:
    healing = healed_llama.certificate.healing
    assert healing is not None and healing["steps"] == HEAL.steps and healing["method"] == "full"
    before, after = healing["holdout_before"]["kl"]["mean"], healed_llama.certificate.holdout["kl"]["mean"]
    assert after < before, f"healing did not lower held-out KL: {before} → {after}"
    assert healing["calibration_after"]["kl"]["mean"] < healing["calibration_before"]["kl"]
    assert healing["losses"][-1] < healing["losses"][0]
    assert "after healing" in healed_llama.certificate.statement()


def test_held_out_samples_never_reach_healing(healed_llama: Any) -> None:
    manifest = healed_llama.manifest.as_dict()
    splits = manifest["calibration"]["split_indices"]
    seen = manifest["certificate"]["healing"]["samples"]
    assert seen["calibration"] == sorted(splits["calibration"])
    assert not set(seen["calibration"]) & (set(splits["holdout"]) | set(splits["test"]))
    assert seen["heal_data"] == list(range(5))


def test_healed_checkpoint_is_plain_and_holds_the_healed_weights(healed_llama: Any, tiny_model_dir) -> None:
    """The fresh-process reload equals the in-memory healed model; only the trained layers changed."""
    manifest = healed_llama.manifest.as_dict()
    assert manifest["reload_check"]["max_abs_logit_error"] <= 1e-4
    [removed] = manifest["layers"]["removed"]
    trained = manifest["certificate"]["healing"]["trained_layers"]
    assert trained == layers_to_train(6, [removed], HEAL) and removed not in trained
    source, slim = _tensors(tiny_model_dir(LLAMA)), _tensors(healed_llama.out_dir / "model")
    kept = manifest["layers"]["kept"]
    renamed = {f"model.layers.{new}.": f"model.layers.{old}." for new, old in enumerate(kept)}
    changed = set()
    for name, tensor in slim.items():
        prefix = next((p for p in renamed if name.startswith(p)), None)
        original = name if prefix is None else renamed[prefix] + name[len(prefix):]
        assert original in source, f"{name} is not a tensor of the original checkpoint"
        if not (tensor == source[original]).all():
            changed.add(int(original.split(".")[2]) if prefix else original)
    assert changed and changed <= set(trained), f"tensors outside the trained layers changed: {changed}"


def test_healing_is_deterministic_and_undo_is_exact(tiny_model_dir) -> None:
    import torch

    from skipit.compressor.analyze import run_pass
    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.calibration import load_calibration
    from skipit.compressor.batches import encode
    from skipit.compressor.heal import HealData, heal_
    from skipit.compressor.loading import load_model

    loaded = load_model(tiny_model_dir(LLAMA))
    spec = decoder_spec(loaded.model)
    batches = encode(load_calibration(limit=12).samples[:8], loaded.processor, spec, batch_size=4, max_length=32)
    teacher = run_pass(loaded.model, spec, batches, keep_reference=True, layer_scores=False).reference
    data = HealData(batches, teacher, ["calibration"] * len(batches))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    for method in ("full", "lora"):
        config = HealConfig(steps=4, lr=1e-3, method=method)
        first = heal_(loaded.model, spec, [2], data, config)
        healed = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        assert list(healed) == list(before), "healing changed the tensor names"
        assert any(not torch.equal(healed[k], before[k]) for k in before)
        first.undo(loaded.model)
        assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())
        second = heal_(loaded.model, spec, [2], data, config)
        assert second.losses == first.losses and second.tensors == first.tensors
        assert all(torch.equal(v, healed[k]) for k, v in loaded.model.state_dict().items())
        second.undo(loaded.model)


def test_vlm_healing_trains_only_language_decoder_layers(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir(LLAVA)
    result = compress(src, tmp_path / "out", _options(heal=HealConfig(steps=6, lr=1e-3)))
    assert result.certificate.healing is not None
    source, slim = _tensors(src), _tensors(tmp_path / "out" / "model")
    outside = [n for n in source if ".layers." not in n or "vision" in n]
    assert any("vision" in n for n in outside) and any("projector" in n for n in outside)
    for name in outside:  # vision tower, projector, embeddings, final norm, LM head
        assert name in slim and (slim[name] == source[name]).all(), f"{name} changed"
    assert result.manifest.reload_check["max_abs_logit_error"] <= 1e-4


def test_a_healed_gguf_carries_the_healed_weights(tiny_model_dir, tmp_path: Path) -> None:
    """GGUF in, --heal: model.gguf holds the trained tensors re-quantized (here F32, the source's type), so
    llama.cpp's file and model/ are the same model."""
    import torch
    import transformers

    from test_hostile_input import _write_gguf

    src = _write_gguf(tiny_model_dir(LLAMA), tmp_path / "tiny.gguf")
    result = compress(src, tmp_path / "out", _options(heal=HealConfig(steps=6, lr=1e-3), save_dtype="float32"))
    healing, gguf = result.certificate.healing, result.manifest.gguf
    assert gguf["file"] == "model.gguf" and "healed tensors" in gguf["note"]
    assert gguf["healed"]["change_kept"] == pytest.approx(1.0, abs=1e-6)
    assert healing["trained_layers"] and gguf["healed"]["tensors"] == len(healing["tensors"])
    size = result.manifest.size
    assert size["bytes"]["model.gguf"] == (tmp_path / "out" / "model.gguf").stat().st_size < size["bytes"]["source"]
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf").eval()
    from_dir = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(from_gguf(ids).logits, from_dir(ids).logits, atol=1e-4)
