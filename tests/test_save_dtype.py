"""The saved checkpoint keeps the source's dtype (issue 12): a bf16 checkpoint comes out bf16 and smaller,
the certificate is measured on the cast model (what is written), and the cast's own KL is recorded."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from skipit.compressor.certificate import CertifyPolicy
from skipit.compressor.dtypes import source_dtype
from skipit.pipeline import CompressOptions, DataOptions, compress

LLAMA = "LlamaForCausalLM"


def _dtypes(model_dir: Path) -> set[str]:
    found = set()
    for path in model_dir.glob("*.safetensors"):
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


def _size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


@pytest.fixture(scope="module")
def bf16_model(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tiny_model_dir(LLAMA)
    out = tmp_path_factory.mktemp("bf16") / "llama-bf16"
    transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def _compress(src: Path, out: Path, **kw: Any) -> Any:
    options = CompressOptions(data=DataOptions(limit=24, batch_size=8, max_length=32),
                              policy=CertifyPolicy(max_kl=None, max_layers=1, probe_width=1), **kw)
    return compress(src, out, options)


def test_source_dtype_is_read_from_the_files(bf16_model: Path, tiny_model_dir, smollm2_gguf: Path) -> None:
    assert source_dtype(bf16_model) == "bfloat16"
    assert source_dtype(tiny_model_dir(LLAMA)) == "float32"
    assert source_dtype(smollm2_gguf) == "bfloat16"  # Q4_1: quantized, saved as bfloat16


def test_a_bf16_checkpoint_comes_out_bf16_smaller_and_certified_as_saved(bf16_model: Path, tmp_path: Path) -> None:
    result = _compress(bf16_model, tmp_path / "out")
    model_dir = tmp_path / "out" / "model"
    assert _dtypes(model_dir) == {"BF16"} and _size(model_dir) < _size(bf16_model)
    hold = result.certificate.holdout
    assert hold["dtype"] == "bfloat16" and hold["cast"]["dtype"] == "bfloat16"
    assert 0 < hold["cast"]["kl"]["mean"] < hold["kl"]["mean"], "the cast's own KL is part of the certified KL"
    facts = result.manifest.reload_check
    assert facts["dtype"] == "bfloat16" and facts["max_abs_logit_error"] <= 1e-4
    assert result.manifest.source["saved_dtype"] == "bfloat16"
    assert "| weights | bfloat16 (source: bfloat16)" in (tmp_path / "out" / "README.md").read_text()


def test_save_dtype_can_be_chosen(bf16_model: Path, tmp_path: Path) -> None:
    result = _compress(bf16_model, tmp_path / "out", save_dtype="float32")
    assert _dtypes(tmp_path / "out" / "model") == {"F32"}
    assert result.certificate.holdout["dtype"] == "float32" and result.certificate.holdout["cast"] is None
