"""Speed measurement: interleaved schedule, warm-up excluded, medians and ratios; real runners' structure.
No timing is asserted (shared CPUs), only what the measurement is made of."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skipit.compressor.loading import load_model
from skipit.errors import InvalidOptionError
from skipit.runtime.torch_runner import TorchRunner
from skipit.validators.speed import measure_speed


class FakeRunner:
    """Takes ``per_token`` seconds per token, so every ratio is known exactly."""

    def __init__(self, name: str, per_token: float, calls: list[str]) -> None:
        self.name, self.device, self.vocab_size = name, "cpu", 100
        self.per_token, self.calls = per_token, calls

    def prefill(self, input_ids: np.ndarray) -> float:
        self.calls.append(self.name)
        assert input_ids.shape[0] == 1 and input_ids.max() < self.vocab_size
        return self.per_token * input_ids.shape[1]

    def decode(self, input_ids: np.ndarray, n_tokens: int) -> float:
        self.calls.append(self.name)
        return self.per_token * n_tokens

    def peak_memory(self) -> None:
        return None


def test_interleaved_schedule_and_exact_ratios() -> None:
    calls: list[str] = []
    runners = {"original": FakeRunner("original", 0.002, calls), "slim": FakeRunner("slim", 0.001, calls)}
    result = measure_speed(runners, seq_lens=(4, 8), repeats=3, warmup=2, decode_tokens=5)
    # every measurement alternates the runners, the order rotating each round (none always follows the same one),
    # warm-up rounds included, and is recorded in order
    assert calls == (["original", "slim", "slim", "original"] * 2 + ["original", "slim"]) * 3
    assert [e["runner"] for e in result.schedule] == calls
    first = [e for e in result.schedule if e["phase"] == "prefill" and e["seq_len"] == 4]
    assert [e["warmup"] for e in first] == [True] * 4 + [False] * 6
    slim, original = result.runners["slim"], result.runners["original"]
    assert len(slim.prefill[8].samples) == 3  # warm-up excluded
    assert original.prefill[8].median == pytest.approx(16.0)  # ms
    assert slim.prefill_speedup == pytest.approx({4: 2.0, 8: 2.0})
    assert slim.prefill_latency_ratio[8] == pytest.approx(0.5)
    assert slim.decode.median == pytest.approx(1.0) and slim.tokens_per_s == pytest.approx(1000.0)
    assert slim.decode_speedup == pytest.approx(2.0) and original.decode_speedup == pytest.approx(1.0)
    as_dict = json.loads(json.dumps(result.as_dict()))
    assert {r["name"] for r in as_dict["runners"]} == {"original", "slim"}
    assert all("median_ms" in r and r["lo_ms"] <= r["median_ms"] <= r["hi_ms"] for r in as_dict["runners"])


def test_bad_arguments_are_refused() -> None:
    runners = {"a": FakeRunner("a", 0.001, [])}
    with pytest.raises(InvalidOptionError, match="baseline"):
        measure_speed(runners, baseline="b")
    with pytest.raises(InvalidOptionError):
        measure_speed(runners, repeats=0)


def test_torch_runners_on_a_tiny_model(tiny_model_dir) -> None:
    loaded = load_model(tiny_model_dir("LlamaForCausalLM"))
    runners = {"original": TorchRunner(loaded.model, "original"), "again": TorchRunner(loaded.model, "again")}
    result = measure_speed(runners, seq_lens=(4, 8), repeats=2, warmup=1, decode_tokens=3)
    for name in runners:
        r = result.runners[name]
        assert set(r.prefill) == {4, 8} and all(t.median > 0 and len(t.samples) == 2 for t in r.prefill.values())
        assert r.decode is not None and r.tokens_per_s > 0
        assert r.memory is not None and r.memory["bytes"] >= 0
    assert result.baseline == "original" and result.runners["original"].prefill_speedup[8] == 1.0
    json.dumps(result.as_dict())
