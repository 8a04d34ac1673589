"""TensorRT exporter: profiles, shape ranges, operator check and sidecar on CPU; engine build and runner
on a GPU with TensorRT (marked ``gpu`` + ``trt``, skipped with a reason elsewhere)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from skipit.errors import (
    BackendUnavailableError,
    EngineIncompatibleError,
    ExportError,
    InvalidOptionError,
    SkipitError,
)
from skipit.exporters import tensorrt as trtx
from skipit.exporters.tensorrt import engine as trt_engine
from skipit.runtime import tensorrt as trt_runtime

N_LAYERS, KV_HEADS, HEAD_DIM, HEADS, VOCAB = 2, 2, 4, 4, 40


# --------------------------------------------------------------------------------------------------
# A tiny decoder graph with the exporter's input/output names and dimension names
# --------------------------------------------------------------------------------------------------
def _tiny_decoder():
    import torch

    class TinyDecoder(torch.nn.Module):
        """Embedding → per layer: GQA attention over [past, new] with mask + causal offset → LM head."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            hidden = HEADS * HEAD_DIM
            self.embed = torch.nn.Embedding(VOCAB, hidden)
            self.pos = torch.nn.Embedding(64, hidden)
            self.q = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(N_LAYERS))
            self.kv = torch.nn.ModuleList(torch.nn.Linear(hidden, 2 * KV_HEADS * HEAD_DIM) for _ in range(N_LAYERS))
            self.head = torch.nn.Linear(hidden, VOCAB)

        def forward(self, input_ids, attention_mask, position_ids, *past):
            b, t = input_ids.shape
            h = self.embed(input_ids) + self.pos(position_ids)
            total = attention_mask.shape[1]
            q_pos = torch.arange(t) + (total - t)
            causal = (torch.arange(total)[None, :] <= q_pos[:, None])[None, None]
            allowed = causal & attention_mask[:, None, None, :].bool()
            bias = torch.where(allowed, 0.0, -1e9)
            presents = []
            for i in range(N_LAYERS):
                q = self.q[i](h).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
                k, v = self.kv[i](h).view(b, t, 2, KV_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
                k, v = torch.cat([past[2 * i], k], 2), torch.cat([past[2 * i + 1], v], 2)
                presents += [k, v]
                rep = HEADS // KV_HEADS
                scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / HEAD_DIM ** 0.5 + bias
                h = h + (scores.softmax(-1) @ v.repeat_interleave(rep, 1)).transpose(1, 2).reshape(b, t, -1)
            return (self.head(h), *presents)

    return TinyDecoder().eval()


def _kv_names(kind: str) -> list[str]:
    return [f"{kind}.{i}.{kv}" for i in range(N_LAYERS) for kv in ("key", "value")]


@pytest.fixture(scope="session")
def decoder_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``DIR/onnx/model.onnx`` with ``DIR/config.json`` (max_position_embeddings 64), like skipit's export."""
    import torch

    root = tmp_path_factory.mktemp("trt_decoder")
    (root / "onnx").mkdir()
    (root / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    path = root / "onnx" / "model.onnx"
    past = [torch.zeros(1, KV_HEADS, 2, HEAD_DIM) for _ in range(2 * N_LAYERS)]
    args = (torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long),
            torch.arange(2, 5)[None], *past)
    inputs = ["input_ids", "attention_mask", "position_ids", *_kv_names("past_key_values")]
    outputs = ["logits", *_kv_names("present")]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "sequence"}}
    axes |= {n: {0: "batch", 2: "past_sequence"} for n in _kv_names("past_key_values")}
    axes |= {n: {0: "batch", 2: "total"} for n in _kv_names("present")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_tiny_decoder(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=18, dynamo=False)
    return path


def _ort(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _prefill_feed(batch: int = 1, seq: int = 5, past: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, past + seq), np.int64),
            "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64)}
    feed |= {n: rng.standard_normal((batch, KV_HEADS, past, HEAD_DIM)).astype(np.float32)
             for n in _kv_names("past_key_values")}
    return feed


def _graph(nodes, inputs, outputs, *, opsets=(("", 18),), functions=()):
    """A small hand-built ONNX model (float tensors) from (name, shape) inputs and outputs."""
    from onnx import TensorProto, helper

    def vi(name, shape, dtype=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, dtype, shape)

    graph = helper.make_graph(nodes, "g", [vi(*i) for i in inputs], [vi(*o) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                             functions=list(functions), ir_version=9)


def _save(model, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


def _identity(name: str):
    from onnx import helper

    return helper.make_node("Identity", [name], ["out"])


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------
def test_parse_profiles_cli_form():
    prefill, decode = trtx.parse_profiles("prefill=1x1..1x2048,decode=1x1..4x1")
    assert (prefill.name, prefill.kind, prefill.min, prefill.max) == ("prefill", "prefill", (1, 1), (1, 2048))
    assert prefill.opt == (1, 1024)  # derived midpoint
    assert (decode.kind, decode.min, decode.opt, decode.max) == ("decode", (1, 1), (2, 1), (4, 1))


def test_parse_profiles_opt_fixed_whitespace_and_roundtrip():
    (spec,) = trtx.parse_profiles(" prefill = 1x1 .. 1X128 .. 1x2048 ")
    assert spec.opt == (1, 128)
    assert trtx.parse_profile(str(spec)) == spec
    (fixed,) = trtx.parse_profiles(["decode_spec=2x4"])
    assert fixed.min == fixed.opt == fixed.max == (2, 4) and fixed.kind == "decode"
    assert trtx.as_profiles([spec]) == (spec,)


@pytest.mark.parametrize("text, hint", [
    ("", "prefill=1x1..1x2048,decode=1x1..4x1"),
    ("prefill", "has no name="),
    ("prefill=1x0..1x2048", "prefill=1x1..1x2048"),
    ("decode=0x1..4x1", "≥ 1"),
    ("prefill=1x2048..1x1", "prefill=1x1..1x2048"),
    ("prefill=1x1..1x4096..1x2048", "min ≤ opt ≤ max"),
    ("prefill=1-2048", "is not BATCHxSEQ"),
    ("prefill=1x1..1x2..1x3..1x4", "min..opt..max"),
    ("chat=1x1..1x8", "must start with 'prefill' or 'decode'"),
    ("prefill=1x1..1x8,prefill=1x1..1x16", "given twice"),
])
def test_parse_profiles_rejects_with_a_fix(text, hint):
    with pytest.raises(InvalidOptionError) as info:
        trtx.parse_profiles(text)
    assert isinstance(info.value, SkipitError)
    assert hint in str(info.value)


def test_profile_spec_validates_when_built_directly():
    with pytest.raises(InvalidOptionError, match="≥ 1"):
        trtx.ProfileSpec("prefill", (1, 0), (1, 8))


# --------------------------------------------------------------------------------------------------
# Shape ranges
# --------------------------------------------------------------------------------------------------
def test_shape_ranges_prefill_and_decode(decoder_onnx):
    ranges = trtx.shape_ranges(decoder_onnx, "prefill=1x1..1x2048,decode=1x1..4x1", max_context=4096)
    assert list(ranges) == ["prefill", "decode"]
    pre, dec = ranges["prefill"], ranges["decode"]
    assert set(pre) == {"input_ids", "attention_mask", "position_ids", *_kv_names("past_key_values")}
    assert pre["input_ids"] == ((1, 1), (1, 1024), (1, 2048))
    assert pre["position_ids"] == pre["input_ids"]
    assert pre["past_key_values.0.key"] == ((1, KV_HEADS, 1, HEAD_DIM),) * 3  # the masked dummy slot
    assert pre["attention_mask"] == ((1, 2), (1, 1025), (1, 2049))
    assert dec["input_ids"] == ((1, 1), (2, 1), (4, 1))
    assert dec["past_key_values.1.value"] == ((1, KV_HEADS, 1, HEAD_DIM), (2, KV_HEADS, 2048, HEAD_DIM),
                                              (4, KV_HEADS, 4096, HEAD_DIM))
    assert dec["attention_mask"] == ((1, 2), (2, 2049), (4, 4097))
    assert all(d >= 1 for r in (*pre.values(), *dec.values()) for shape in r for d in shape)


def test_shape_ranges_reject_a_profile_the_graph_cannot_take(tmp_path, decoder_onnx):
    fixed_batch = _save(_graph([_identity("input_ids")], [("input_ids", [1, "sequence"])],
                               [("out", [1, "sequence"])]), tmp_path / "fixed.onnx")
    assert trtx.shape_ranges(fixed_batch, "decode=1x1..1x1", 8)["decode"]["input_ids"] == ((1, 1),) * 3
    with pytest.raises(InvalidOptionError, match="fixed at 1"):
        trtx.shape_ranges(fixed_batch, "decode=1x1..4x1", 8)
    unknown = _save(_graph([_identity("pixels")], [("pixels", ["n", "h"])], [("out", ["n", "h"])]),
                    tmp_path / "unknown.onnx")
    with pytest.raises(ExportError, match="does not know what it measures"):
        trtx.shape_ranges(unknown, "prefill=1x1..1x8", 8)
    with pytest.raises(InvalidOptionError, match="--max-context"):
        trtx.shape_ranges(decoder_onnx, "prefill=1x1..1x2048", 1024)
    with pytest.raises(ExportError, match="does not exist"):
        trtx.shape_ranges(tmp_path / "missing.onnx", "prefill=1x1..1x8", 8)


def test_default_max_context_reads_config(decoder_onnx, tmp_path):
    assert trtx.default_max_context(decoder_onnx) == 64
    lone = _save(_graph([_identity("input_ids")], [("input_ids", ["batch", "sequence"])],
                        [("out", ["batch", "sequence"])]), tmp_path / "lone.onnx")
    with pytest.raises(InvalidOptionError, match="max_context"):
        trtx.default_max_context(lone)


def test_dummy_past_gives_the_same_logits_as_an_empty_cache(decoder_onnx):
    """The documented prefill trick, checked on onnxruntime: a masked length-1 dummy cache == no cache,
    and a decode step that keeps the dummy slot == one that never had it."""
    session = _ort(decoder_onnx)
    names = [o.name for o in session.get_outputs()]
    feed = _prefill_feed(batch=2, seq=5)
    plain = dict(zip(names, session.run(None, feed)))
    dummy_feed = trt_runtime.with_dummy_past(feed)
    assert dummy_feed["past_key_values.0.key"].shape == (2, KV_HEADS, 1, HEAD_DIM)
    assert dummy_feed["attention_mask"].shape == (2, 6) and (dummy_feed["attention_mask"][:, 0] == 0).all()
    dummy = dict(zip(names, session.run(None, dummy_feed)))
    np.testing.assert_allclose(dummy["logits"], plain["logits"], atol=1e-5)
    assert dummy["present.0.key"].shape[2] == plain["present.0.key"].shape[2] + 1

    def step(out, mask):
        nxt = {"input_ids": out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64),
               "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
               "position_ids": np.full((2, 1), 5, np.int64)}
        nxt |= {p: out[p.replace("past_key_values", "present")] for p in _kv_names("past_key_values")}
        return session.run(None, nxt)[0]

    np.testing.assert_allclose(step(dummy, dummy_feed["attention_mask"]), step(plain, feed["attention_mask"]),
                               atol=1e-5)
    assert trt_runtime.with_dummy_past(dummy_feed).keys() == dummy_feed.keys()  # non-empty cache: unchanged


def test_polygraphy_profiles_carry_the_shape_ranges(decoder_onnx):
    ranges = trtx.shape_ranges(decoder_onnx, "prefill=1x1..1x16,decode=1x1..2x1", max_context=32)
    profiles = trtx.polygraphy_profiles(ranges)
    assert len(profiles) == 2
    for profile, inputs in zip(profiles, ranges.values()):
        assert set(profile) == set(inputs)
        for name, (lo, mid, hi) in inputs.items():
            assert (tuple(profile[name].min), tuple(profile[name].opt), tuple(profile[name].max)) == (lo, mid, hi)


def test_decoder_engine_runner_decodes_like_onnxruntime(decoder_onnx):
    """TrtDecoderRunner — the prompt with a masked dummy past slot, kept in the cache for every step — run by
    Polygraphy's onnxruntime runner (the interface of its TrtRunner) gives the plain ONNX runner's logits and
    greedy tokens: the engine's decoding path, checked on a CPU."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from skipit.runtime.ort_text import OrtDecoderRunner

    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 5)).astype(np.int64)
    plain = OrtDecoderRunner(decoder_onnx)
    runner = OnnxrtRunner(SessionFromOnnx(str(decoder_onnx), providers=["CPUExecutionProvider"]))
    try:
        engine_like = trt_runtime.TrtDecoderRunner(runner)
        logits, (present, mask) = engine_like.start(ids)
        np.testing.assert_allclose(logits, plain.forward(ids)[0], atol=1e-5)
        assert present[0][0].shape[2] == 6 and mask.shape == (2, 6) and (mask[:, 0] == 0).all()
        np.testing.assert_array_equal(engine_like.generate_greedy(ids, 6), plain.generate_greedy(ids, 6))
    finally:
        runner.deactivate()


def test_trt_ops_table_is_data_naming_its_tensorrt_version():
    table = json.loads((Path(trt_engine.__file__).with_name("trt_ops.json")).read_text())
    assert table["tensorrt_version"] == trtx.TRT_OPS_VERSION
    assert trtx.TRT_ONNX_OPS == frozenset(table["operators"]) and "MatMul" in trtx.TRT_ONNX_OPS


# --------------------------------------------------------------------------------------------------
# Operator compatibility
# --------------------------------------------------------------------------------------------------
def test_compatibility_passes_on_the_decoder_graph(decoder_onnx):
    report = trtx.check_trt_compatibility(decoder_onnx, opset=18)
    assert report, report.problems
    assert report.opset == 18 and not report.unsupported
    assert {"MatMul", "Softmax", "Concat"} <= set(report.op_counts)
    assert set(report.op_counts) <= trtx.TRT_ONNX_OPS
    json.dumps(report.as_dict())
    report.raise_for_problems()
    stale = trtx.check_trt_compatibility(decoder_onnx, opset=17)
    assert not stale and "expected at opset 17" in stale.problems[0]


def test_compatibility_flags_onnxruntime_contrib_ops(tmp_path):
    from onnx import helper

    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain="com.microsoft", alpha=1.0)
    path = _save(_graph([node], [("a", [2, 2]), ("b", [2, 2])], [("y", [2, 2])],
                        opsets=(("", 18), ("com.microsoft", 1))), tmp_path / "ort_fused.onnx")
    report = trtx.check_trt_compatibility(path)
    assert not report and report.unsupported == ("com.microsoft::FusedMatMul",)
    assert "optimum --optimize" in report.problems[0]
    with pytest.raises(ExportError, match="not TensorRT-compatible"):
        report.raise_for_problems()
    with pytest.raises(ExportError, match="com.microsoft::FusedMatMul"):
        trtx.build_engine(path, tmp_path / "engines", "prefill=1x1..1x8", max_context=8)


def test_compatibility_unsupported_op_opset_and_local_function(tmp_path):
    from onnx import helper

    unique = _save(_graph([helper.make_node("Unique", ["x"], ["y"])], [("x", [4])], [("y", ["n"])]),
                   tmp_path / "unique.onnx")
    report = trtx.check_trt_compatibility(unique)
    assert report.unsupported == ("Unique",) and "support table" in report.problems[0]
    # A local function of a custom domain is inlined by TensorRT: its body is what counts.
    body = [helper.make_node("Relu", ["x"], ["y"])]
    fn = helper.make_function("local", "MyRelu", ["x"], ["y"], body, [helper.make_opsetid("", 18)])
    call = helper.make_node("MyRelu", ["x"], ["y"], domain="local")
    func = _save(_graph([call], [("x", [4])], [("y", [4])], opsets=(("", 18), ("local", 1)), functions=[fn]),
                 tmp_path / "func.onnx")
    assert trtx.check_trt_compatibility(func).op_counts == {"Relu": 1}
    new_op = _save(_graph([helper.make_node("Relu", ["x"], ["y"])], [("x", [4])], [("y", [4])],
                          opsets=(("", 30),)), tmp_path / "opset30.onnx")
    assert any("outside TensorRT 10's range" in p for p in trtx.check_trt_compatibility(new_op).problems)


def test_compatibility_works_without_polygraphy(monkeypatch, decoder_onnx):
    monkeypatch.setitem(sys.modules, "polygraphy.backend.onnx.util", None)
    report = trtx.check_trt_compatibility(decoder_onnx)
    assert report and report.summary is None


# --------------------------------------------------------------------------------------------------
# Sidecar
# --------------------------------------------------------------------------------------------------
ENV = trtx.EngineEnv(tensorrt_version="10.15.1", cuda_version="12.8", gpu_name="NVIDIA H100 80GB HBM3",
                     compute_capability="9.0")


def _sidecar(tmp_path, decoder_onnx) -> trtx.EngineSidecar:
    specs = trtx.parse_profiles("prefill=1x1..1x16,decode=1x1..2x1")
    ranges = trtx.shape_ranges(decoder_onnx, specs, 32)
    return trt_engine._make_sidecar(tmp_path / "model.engine", decoder_onnx, specs, ranges, "fp16", 32, ENV)


def test_sidecar_roundtrip(tmp_path, decoder_onnx):
    sidecar = _sidecar(tmp_path, decoder_onnx)
    path = trtx.write_sidecar(tmp_path / "model.engine", sidecar)
    assert path.name == "model.engine.json"
    back = trtx.read_sidecar(tmp_path / "model.engine")
    assert back == sidecar
    assert back.onnx_sha256 == trtx.file_sha256(decoder_onnx) and len(back.onnx_sha256) == 64
    assert back.shapes["decode"]["input_ids"]["max"] == [2, 1]
    assert back.profiles == ("prefill=1x1..1x8..1x16", "decode=1x1..1x1..2x1")
    trtx.check_engine_compatible(back, ENV)


def test_sidecar_mismatch_is_a_clear_error(tmp_path, decoder_onnx, caplog):
    sidecar = _sidecar(tmp_path, decoder_onnx)
    with pytest.raises(EngineIncompatibleError) as info:
        trtx.check_engine_compatible(sidecar, dataclasses.replace(ENV, tensorrt_version="10.3.0"))
    message = str(info.value)
    assert "TensorRT 10.15.1 (here: 10.3.0)" in message and "--trt --profiles prefill=" in message
    assert isinstance(info.value, ExportError)
    with pytest.raises(EngineIncompatibleError, match="compute capability 9.0"):
        trtx.check_engine_compatible(sidecar, dataclasses.replace(ENV, gpu_name="A100", compute_capability="8.0"))
    with caplog.at_level(logging.WARNING, logger=trtx.__name__):
        trtx.check_engine_compatible(sidecar, dataclasses.replace(ENV, gpu_name="NVIDIA H100 PCIe"))
    assert "may be slower" in caplog.text


def test_sidecar_missing_or_foreign(tmp_path):
    with pytest.raises(ExportError, match="rebuild"):
        trtx.read_sidecar(tmp_path / "model.engine")
    (tmp_path / "model.engine.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ExportError, match="expected 'skipit-trt-engine/1'"):
        trtx.read_sidecar(tmp_path / "model.engine")


# --------------------------------------------------------------------------------------------------
# Without TensorRT: clear errors, no fake success
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail, even where TensorRT is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_build_engine_without_tensorrt_says_how_to_get_it(no_tensorrt, decoder_onnx, tmp_path):
    with pytest.raises(BackendUnavailableError) as info:
        trtx.build_engine(decoder_onnx, tmp_path / "engines", "prefill=1x1..1x16,decode=1x1..2x1")
    assert "TensorRT is not installed" in str(info.value) and "pip install skipit[gpu]" in str(info.value)
    assert not (tmp_path / "engines").exists()
    with pytest.raises(BackendUnavailableError, match="NVIDIA GPU"):
        trt_runtime.TrtRunner(tmp_path / "model.engine").activate()


def test_build_engine_checks_options_before_tensorrt(no_tensorrt, decoder_onnx, tmp_path):
    with pytest.raises(InvalidOptionError, match="fp16, bf16, fp32"):
        trtx.build_engine(decoder_onnx, tmp_path, "prefill=1x1..1x16", precision="int8")
    with pytest.raises(InvalidOptionError, match="≥ 1"):
        trtx.build_engine(decoder_onnx, tmp_path, "prefill=1x0..1x16")


# --------------------------------------------------------------------------------------------------
# GPU + TensorRT
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install skipit[gpu] on a GPU machine)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA is unavailable: TensorRT engines need an NVIDIA GPU")


@pytest.fixture(scope="module")
def fp32_engine(trt_gpu, decoder_onnx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines")
    return trtx.build_engine(decoder_onnx, out, "prefill=1x1..2x16,decode=1x1..2x1", precision="fp32",
                             timing_cache=out / "timing.cache", max_context=32)


@pytest.mark.gpu
@pytest.mark.trt
def test_build_engine_writes_engine_sidecar_and_cache(fp32_engine):
    assert fp32_engine.stat().st_size > 0
    assert (fp32_engine.parent / "timing.cache").stat().st_size > 0
    sidecar = trtx.read_sidecar(fp32_engine)
    assert sidecar.precision == "fp32" and sidecar.max_context == 32
    trtx.check_engine_compatible(sidecar, trtx.current_env())


@pytest.mark.gpu
@pytest.mark.trt
def test_runner_matches_onnxruntime_for_prefill_and_decode(fp32_engine, decoder_onnx):
    session = _ort(decoder_onnx)
    names = [o.name for o in session.get_outputs()]
    prefill = trt_runtime.with_dummy_past(_prefill_feed(batch=2, seq=7))
    with trt_runtime.TrtRunner(fp32_engine) as runner:
        assert sorted(runner.output_names) == sorted(names)
        got = runner.infer(prefill)
        want = dict(zip(names, session.run(None, prefill)))
        for name in names:
            np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4)
        decode = _prefill_feed(batch=2, seq=1, past=9)
        got = runner.infer(decode)
        np.testing.assert_allclose(got["logits"], session.run(None, decode)[0], atol=1e-4, rtol=1e-4)
        assert runner.inference_time is not None
        with pytest.raises(InvalidOptionError, match="with_dummy_past"):
            runner.infer(_prefill_feed(batch=1, seq=4, past=0))


@pytest.mark.gpu
@pytest.mark.trt
def test_fp16_engine_is_close(trt_gpu, decoder_onnx, tmp_path):
    engine = trtx.build_engine(decoder_onnx, tmp_path, "prefill=1x1..1x16", precision="fp16", max_context=32)
    feed = trt_runtime.with_dummy_past(_prefill_feed(batch=1, seq=6))
    with trt_runtime.TrtRunner(engine) as runner:
        got = runner.infer(feed, profile="prefill")["logits"]
    np.testing.assert_allclose(got, _ort(decoder_onnx).run(None, feed)[0], atol=5e-2, rtol=5e-2)
