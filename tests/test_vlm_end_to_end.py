"""VLMs end to end in one command (issue 10), on a second tiny configuration per architecture.

``tiny_models.VARIANTS`` differ from the suite's other tiny VLMs: 8 decoder layers (hidden 64, MHA), patch 8,
Idefics3's 6×6 patch grid (image 48, scale factor 2: the configuration whose export used to fail with
"GatherND … invalid index found"), processors that take any image size (Qwen: 2..4 merged tokens a side,
Idefics3: image splitting on).

* ``skipit-compress VARIANT OUT --max-kl 1e9 --max-layers 2 --export onnx --validate`` exits 0, and
  report.json / report.md / report.html carry the ONNX parity rows of the split graphs, measured on
  image+text and text-only samples.
* The export in ``OUT/onnx`` serves what the processor makes of images unlike the trace's (other sizes and
  aspect ratios, hence other Qwen grids and other numbers of Idefics3 crops, image splitting on and off) and
  two images in one prompt: prefill logits within 1e-4 of the slim torch model and greedy tokens equal.
* ``skipit validate ORIGINAL OUT --onnx OUT/onnx`` reads the split layout (0), a tampered decoder is exit 6,
  and an export whose graph cannot serve an input ends with exit 6 naming it (it used to be exit 1).

Exporter (CPU time): the command runs with ``--exporter legacy`` (``EXPORTER``; ~2 s a graph instead of
15–45 s with dynamo). Idefics3's vision graph has no legacy route and still goes
through dynamo — the route that failed. The dynamo route of the other graphs is covered by
tests/test_onnx_vlm.py and tests/test_onnx_text.py (the unchanged command was run on all four configurations
by hand: exit 0). One compress run per configuration, shared through the module-scoped ``compressed`` fixture;
the module takes about 3 min on two cores.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from tiny_models import SPECS, VARIANTS, load_processor  # noqa: E402

from skipit.cli import compress_main, main  # noqa: E402
from skipit.compat import TRANSFORMERS_MAJOR  # noqa: E402

pytestmark = pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="VLM split-graph export needs transformers 5.x")
log = logging.getLogger(__name__)

ATOL = 1e-4
NEW_TOKENS = 4
PROMPT = "What is in the picture?"
# (width, height) of the images of one prompt; none is the trace's square example nor a size of
# onnx_vlm.PROCESSOR_CHECKS (which the export's own verification already used)
OTHER_IMAGES = ([(70, 30)], [(33, 81)], [(45, 45), (96, 50)])
VARIANT_NAMES = sorted(VARIANTS)
# the ONNX route of each compress run (--exporter); Idefics3's vision graph falls back to dynamo, its only
# route (onnx_vlm._SPECS)
EXPORTER = {name: "legacy" for name in VARIANT_NAMES}


def _draw(width: int, height: int, seed: int) -> Image.Image:
    """A picture of a few filled shapes on a noisy background."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        box = (x0, y0, x0 + int(rng.integers(4, width // 2 + 4)), y0 + int(rng.integers(4, height // 2 + 4)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 samples, image+text and text-only alternating, images of three sizes and aspect ratios."""
    root = tmp_path_factory.mktemp("vlm-calib")
    lines = []
    for i in range(12):
        if i % 2:
            lines.append({"text": f"Note {i}: the quick brown fox jumps over lazy dog number {i} at dawn."})
            continue
        w, h = [(64, 40), (40, 72), (56, 56)][i // 2 % 3]
        _draw(w, h, seed=i).save(root / f"img{i}.png")
        lines.append({"image": f"img{i}.png", "text": f"Describe picture {i}."})
    path = root / "calib.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


@dataclass
class Run:
    name: str
    source: Path
    out: Path
    exit_code: int
    seconds: float


@pytest.fixture(scope="module")
def compressed(tiny_model_dir, calib_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """``compressed(name)`` runs skipit-compress once per variant for the whole module."""
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            source = tiny_model_dir(name)
            out = tmp_path_factory.mktemp(f"e2e-{name}") / "out"
            started = time.perf_counter()
            code = compress_main([str(source), str(out), "--max-kl", "1e9", "--max-layers", "2", "--export",
                                  "onnx", "--exporter", EXPORTER[name], "--validate", "--calib", str(calib_file),
                                  "--max-length", "48", "--probe-width", "1", "--max-vision-attention", "none"])
            cache[name] = Run(name, source, out, code, time.perf_counter() - started)
            log.info("skipit-compress %s: exit %d in %.0f s", name, code, cache[name].seconds)
        return cache[name]

    return get


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_compress_export_validate_exits_0_with_onnx_parity_rows(name: str, compressed) -> None:
    import onnx

    run = compressed(name)
    assert run.exit_code == 0
    routes = {}
    for graph in ("vision_encoder", "decoder_model_merged"):
        proto = onnx.load(str(run.out / "onnx" / "onnx" / f"{graph}.onnx"), load_external_data=False)
        routes[graph] = {p.key: p.value for p in proto.metadata_props}["skipit.exporter"]
    vision_route = "dynamo" if name.startswith("idefics3") else EXPORTER[name] or "dynamo"
    assert routes == {"vision_encoder": vision_route, "decoder_model_merged": EXPORTER[name] or "dynamo"}
    report = json.loads((run.out / "report.json").read_text())
    onnx = report["validation"]["onnx"]
    assert onnx["layout"] == "split"
    assert onnx["samples"]["image+text"] >= 1 and onnx["samples"]["text"] >= 1
    assert onnx["logits"]["max_abs"] <= 1e-3 and onnx["generation"]["sequence_match"] == 1.0
    rows = {c["name"]: c for c in report["validation"]["checks"] if c["kind"] == "export"}
    assert set(rows) == {"onnx max |Δlogit|", "onnx greedy token match"}
    assert all(c["passed"] for c in rows.values())
    assert "image+text" in rows["onnx max |Δlogit|"]["note"]
    for page in ("report.md", "report.html"):
        text = (run.out / page).read_text()
        assert "onnx max" in text and "onnx greedy token match" in text and "split graphs" in text, page


def _other_inputs(name: str, model_dir: Path) -> list[tuple[str, dict]]:
    """Processor inputs for OTHER_IMAGES (Idefics3: with image splitting on and off)."""
    arch = VARIANTS[name].arch
    processor = load_processor(model_dir)
    options = [{"do_image_splitting": True}, {"do_image_splitting": False}] if arch.startswith("Idefics3") else [{}]
    cases = []
    for i, sizes in enumerate(OTHER_IMAGES):
        images = [_draw(w, h, seed=100 + i) for w, h in sizes]
        for opts in options:
            text = SPECS[arch].image_prompt * len(images) + PROMPT
            cases.append((f"{sizes} {opts}", dict(processor(text=[text], images=[images], return_tensors="pt", **opts))))
    return cases


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_export_serves_images_unlike_the_trace(name: str, compressed) -> None:
    """Prefill logits and greedy tokens of OrtVlmRunner vs the slim torch model, on other image sizes, aspect
    ratios and a prompt with two images."""
    from skipit.compressor.loading import load_model
    from skipit.exporters.onnx_vlm import OrtVlmRunner

    run = compressed(name)
    assert run.exit_code == 0
    model = load_model(run.out / "model").model
    runner = OrtVlmRunner(run.out / "onnx")
    cases = _other_inputs(name, run.out / "model")
    vision_shapes = set()
    for what, inputs in cases:
        ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
        with torch.no_grad():
            ref = model(**inputs).logits.numpy()
            expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False).numpy()
        logits = runner.prefill(ids, inputs, mask)[0]
        err = float(np.abs(logits - ref).max())
        log.info("%s %s: max |Δlogit| %.3g", name, what, err)
        assert err <= ATOL, what
        got = runner.generate_greedy(ids, inputs, NEW_TOKENS, attention_mask=mask,
                                     eos_token_id=model.generation_config.eos_token_id,
                                     pad_token_id=model.generation_config.pad_token_id)
        np.testing.assert_array_equal(got, expected, err_msg=what)
        grid = inputs.get("image_grid_thw")
        vision_shapes.add(tuple(map(tuple, grid.tolist())) if grid is not None else tuple(inputs["pixel_values"].shape))
    # the cases really differ in what reaches the vision graph: LLaVA one vs two images; Qwen other grids;
    # Idefics3 another number of crops
    assert len(vision_shapes) >= 2 if name.startswith("llava") else len(vision_shapes) >= 3


def test_validate_reads_the_split_export_and_fails_a_tampered_decoder_with_exit_6(compressed, tmp_path: Path) -> None:
    """`skipit validate ORIGINAL OUT --onnx OUT/onnx`: 0 as exported; 6 when the LM head in the decoder graph
    is perturbed (a copy of the export)."""
    import onnx

    run = compressed("qwen2-vl-p8")
    fast = ["--new-tokens", "2", "--json", str(tmp_path / "v.json")]
    assert main(["validate", str(run.source), str(run.out), "--onnx", str(run.out / "onnx"), *fast]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["onnx"]["layout"] == "split"

    tampered = tmp_path / "tampered"
    shutil.copytree(run.out / "onnx", tampered)
    path = tampered / "onnx" / "decoder_model_merged.onnx"
    graph = onnx.load(str(path))
    head = max(graph.graph.initializer, key=lambda t: ("lm_head" in t.name, int(np.prod(t.dims))))
    weights = onnx.numpy_helper.to_array(head) + 0.5
    head.CopyFrom(onnx.numpy_helper.from_array(weights.astype(np.float32), head.name))
    onnx.save(graph, str(path))
    assert main(["validate", str(run.source), str(run.out), "--onnx", str(tampered), *fast]) == 6


def test_runner_names_an_input_the_graph_cannot_serve(compressed) -> None:
    """LLaVA's vision graph has the CLIP crop size fixed: another size is refused with exit code 6 and the
    input's name, not an onnxruntime stack."""
    from skipit.errors import ExportMismatchError
    from skipit.exporters.onnx_vlm import OrtVlmRunner

    runner = OrtVlmRunner(compressed("llava-p8").out / "onnx")
    with pytest.raises(ExportMismatchError, match=r"pixel_values of shape \[num_images, 3, 48, 48\]") as info:
        runner.image_features({"pixel_values": np.zeros((1, 3, 56, 56), np.float32)})
    assert info.value.exit_code == 6


def test_export_that_cannot_serve_an_input_exits_6_naming_it(tiny_model_dir, tmp_path: Path, monkeypatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Without the constant-arange translation the Idefics3 6×6-grid vision graph gathers out of range (the
    original bug): the export's own verification says which input it cannot serve, exit 6 (it was exit 1)."""
    import skipit.exporters.onnx_vlm as onnx_vlm

    monkeypatch.setattr(onnx_vlm, "dynamo_translations", dict)
    code = main(["export", str(tiny_model_dir("idefics3-p8")), str(tmp_path / "out"), "--exporter", "legacy"])
    err = capsys.readouterr().err
    assert code == 6
    assert "cannot serve" in " ".join(err.split()) and "pixel_values" in err
    assert not (tmp_path / "out" / "onnx" / "vision_encoder.onnx").exists()


def test_constant_float_arange_keeps_torch_length() -> None:
    """torch sizes arange(1/6, 1, 1/6) in double (6 values), ONNX Range in float32 (5): the dynamo route emits
    torch's values, so a bucketize over them runs and matches."""
    import onnxruntime as ort

    from skipit.exporters.onnx_text import dynamo_translations

    class Buckets(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            boundaries = torch.arange(1 / 6, 1.0, 1 / 6)
            return torch.bucketize(x, boundaries, right=True) + boundaries.shape[0]

    x = torch.linspace(0, 0.999, 7)
    program = torch.onnx.export(Buckets().eval(), (x,), dynamo=True, custom_translation_table=dynamo_translations(),
                                dynamic_shapes=({0: torch.export.Dim.AUTO},), verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    probe = np.linspace(0, 0.9999, 13, dtype=np.float32)
    got = session.run(None, {session.get_inputs()[0].name: probe})[0]
    np.testing.assert_array_equal(got, Buckets()(torch.from_numpy(probe)).numpy())


def test_cross_modal_condition_that_keeps_every_layer_is_named(tiny_model_dir, calib_file: Path, tmp_path: Path,
                                                               capsys) -> None:
    """A random tiny VLM's text attends mostly to the image in every layer: exit 3 naming the condition and its flag."""
    code = compress_main([str(tiny_model_dir("llava-p8")), str(tmp_path / "out"), "--max-kl", "1e9",
                          "--max-layers", "2", "--calib", str(calib_file), "--max-length", "48", "--probe-width", "1"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 3 and "cross-modal condition keeps every unprotected layer" in err and "--max-vision-attention" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as refused:
        compress_main([str(tiny_model_dir("llava-p8")), str(tmp_path / "o2"), "--max-vision-attention", "1.5"])
    assert refused.value.code == 2 and "expected a share in (0, 1] or 'none'" in capsys.readouterr().err
