"""onnxruntime runner of a split VLM export (:func:`skipit.exporters.onnx.export_vlm`): image + prompt → tokens.

Position ids: LLaVA / Idefics3 use the running count of the attention mask; Qwen2-VL / Qwen2.5-VL use
:func:`mrope_position_ids` (a numpy port of the model's ``get_rope_index``, images only) for the prompt and
``running text position + rope_delta`` on all three axes for every decode step, as transformers' ``generate``
does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from skipit.errors import ExportError, ExportMismatchError, InvalidOptionError
from skipit.exporters.onnx.convention import (
    DECODER_FILE,
    EMBED_FILE,
    GRAPH_FILES,
    ONNX_SUBDIR,
    ORT_DTYPES,
    VISION_FILE,
    kv_layers,
    kv_output_names,
    position_ids_from_mask,
)
from skipit.runtime.base import greedy_decode, host
from skipit.runtime.ort import ort_session

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

KV = list[tuple["np.ndarray", "np.ndarray"]]


def mrope_position_ids(input_ids: "np.ndarray", image_grid_thw: "np.ndarray | None", image_token_id: int,
                       spatial_merge_size: int, attention_mask: "np.ndarray | None" = None,
                       video_token_id: int | None = None) -> tuple["np.ndarray", "np.ndarray"]:
    """numpy port of Qwen2-VL / Qwen2.5-VL ``get_rope_index`` for text + images.

    Text tokens count up on all three axes; the tokens of an image (consecutive ``image_token_id``s) take
    (temporal, row, column) positions of its merged grid offset by the current position, after which
    counting resumes at ``start + max(rows, cols)``. Padding (mask 0) gets position 0.

    Returns:
        ``(position_ids [3, batch, seq], rope_deltas [batch, 1])``; a cached step at running text
        position ``p`` (count of attended tokens minus one) uses ``p + rope_delta`` on all three axes.
    """
    import numpy as np

    ids = np.asarray(input_ids, dtype=np.int64)
    batch, seq = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    grids = iter([] if image_grid_thw is None else np.asarray(image_grid_thw, dtype=np.int64).tolist())
    positions = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        keep = mask[b].astype(bool)
        tokens = ids[b][keep]
        if video_token_id is not None and (tokens == video_token_id).any():
            raise InvalidOptionError("video inputs are not supported by the ONNX VLM runner (images only)")
        pieces, current, i = [], 0, 0
        while i < len(tokens):
            j = i
            is_image = tokens[i] == image_token_id
            while j < len(tokens) and (tokens[j] == image_token_id) == is_image:
                j += 1
            if not is_image:
                pieces.append(np.broadcast_to(np.arange(j - i) + current, (3, j - i)))
                current += j - i
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise InvalidOptionError("the prompt has more image-token runs than image_grid_thw rows") from None
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                block = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current
                if block.shape[1] != j - i:
                    raise InvalidOptionError(
                        f"an image run has {j - i} image tokens but its grid {t}×{h}×{w} gives {block.shape[1]}")
                pieces.append(block)
                current += max(h, w) // spatial_merge_size
            i = j
        flat = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, b, keep] = flat
        deltas[b, 0] = (flat.max() + 1 - len(tokens)) if flat.size else 0
    return positions, deltas


class OrtVlmRunner:
    """Runs the three graphs of a split export with onnxruntime; a :class:`~skipit.runtime.base.StepDecoder`
    (position ids: see the module docstring). ``past`` / ``present`` are lists of (key, value) arrays per layer.
    """

    def __init__(self, out_dir: str | os.PathLike, providers: list[str] | None = None,
                 session_options: Any = None, onnx_dir: str | os.PathLike | None = None) -> None:
        """Open ``out_dir/onnx/*.onnx`` (``onnx_dir`` overrides that folder) and read ``out_dir/config.json``."""
        from skipit.compressor.arch import REGISTRY, ArchSpec

        self.out_dir = Path(out_dir)
        onnx_dir = Path(onnx_dir) if onnx_dir is not None else self.out_dir / ONNX_SUBDIR
        missing = [n for n in GRAPH_FILES if not (onnx_dir / n).is_file()]
        config_path = self.out_dir / "config.json"
        if missing or not config_path.is_file():
            raise ExportError(f"{self.out_dir} is not a split VLM export (missing {missing or ['config.json']}); "
                              "run export_vlm first")
        self.providers = providers or ["CPUExecutionProvider"]
        self.vision = ort_session(onnx_dir / VISION_FILE, self.providers, session_options)
        self.embed_session = ort_session(onnx_dir / EMBED_FILE, self.providers, session_options)
        self.decoder = ort_session(onnx_dir / DECODER_FILE, self.providers, session_options)

        self.config = json.loads(config_path.read_text())
        self.architecture = (self.config.get("architectures") or [""])[0]
        keys = (REGISTRY.get(self.architecture) or ArchSpec(self.architecture)).image_token_keys
        image_token_id = next((self.config[k] for k in keys if isinstance(self.config.get(k), int)), None)
        if image_token_id is None:
            raise ExportError(f"{config_path} names no image token ({' / '.join(keys)})")
        self.image_token_id: int = image_token_id
        self.video_token_id = self.config.get("video_token_id")
        self.spatial_merge_size = int((self.config.get("vision_config") or {}).get("spatial_merge_size") or 1)

        self._vision_types = {i.name: ORT_DTYPES.get(i.type, "float32") for i in self.vision.get_inputs()}
        dec_inputs = {i.name: i for i in self.decoder.get_inputs()}
        layers = kv_layers(list(dec_inputs))
        if layers != list(range(len(layers))) or "inputs_embeds" not in dec_inputs:
            raise ExportError(f"{DECODER_FILE} is not a merged decoder graph taking inputs_embeds")
        self.num_layers = len(layers)
        self.mrope = len(dec_inputs["position_ids"].shape) == 3
        kv = dec_inputs.get("past_key_values.0.key")
        self.kv_heads: int
        self.head_dim: int
        self.kv_heads, self.head_dim = (kv.shape[1], kv.shape[3]) if kv is not None else (0, 0)
        self.float_type = ORT_DTYPES.get(dec_inputs["inputs_embeds"].type, "float32")
        self.vocab_size = self.decoder.get_outputs()[0].shape[-1]
        self._present = kv_output_names(self.num_layers)

    # -- the three graphs ----------------------------------------------------------------------------
    def embed(self, input_ids: "np.ndarray") -> "np.ndarray":
        """Token embeddings [batch, seq, hidden]."""
        import numpy as np

        return self.embed_session.run(["inputs_embeds"], {"input_ids": np.asarray(input_ids, dtype=np.int64)})[0]

    def image_features(self, pixel_inputs: Mapping[str, Any]) -> "np.ndarray":
        """Vision encoder: the processor's pixel inputs (extra keys ignored) → [n_image_tokens, hidden]."""
        import numpy as np

        missing = [n for n in self._vision_types if n not in pixel_inputs]
        if missing:
            raise InvalidOptionError(f"{self.architecture} needs pixel inputs {missing} (from its processor)")
        feed = {n: np.asarray(host(pixel_inputs[n]), dtype=t) for n, t in self._vision_types.items()}
        self._check_vision_shapes(feed)
        return self.vision.run(["image_features"], feed)[0]

    def _check_vision_shapes(self, feed: Mapping[str, "np.ndarray"]) -> None:
        """Refuse inputs whose rank or fixed dimensions differ from the graph's, naming them."""
        for value in self.vision.get_inputs():
            got, want = feed[value.name].shape, value.shape
            if len(got) != len(want) or any(isinstance(w, int) and w != g for g, w in zip(got, want)):
                shown = ", ".join(str(d) for d in want)
                raise ExportMismatchError(
                    f"{VISION_FILE} takes {value.name} of shape [{shown}] (the numbers are fixed in the graph: the "
                    f"model's image size); got {list(got)}. This export cannot serve that input: use the processor "
                    f"saved with the export, or export again from a checkpoint whose processor makes such inputs")

    def decode_step(self, inputs_embeds: "np.ndarray", attention_mask: "np.ndarray", position_ids: "np.ndarray",
                    past: Sequence[tuple["np.ndarray", "np.ndarray"]] | None = None
                    ) -> tuple["np.ndarray", list[tuple["np.ndarray", "np.ndarray"]]]:
        """One decoder call: logits [batch, seq, vocab] and the present cache (past + these tokens)."""
        import numpy as np

        batch = inputs_embeds.shape[0]
        if past is None:
            shape = (batch, self.kv_heads, 0, self.head_dim)
            past = [(np.zeros(shape, self.float_type), np.zeros(shape, self.float_type))] * self.num_layers
        if len(past) != self.num_layers:
            raise InvalidOptionError(f"past has {len(past)} layers, the decoder graph {self.num_layers}")
        feed = {
            "inputs_embeds": np.asarray(inputs_embeds, dtype=self.float_type),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.asarray(position_ids, dtype=np.int64),
        }
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        out = self.decoder.run(["logits", *self._present], feed)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]

    # -- composition ---------------------------------------------------------------------------------
    def prompt_embeddings(self, input_ids: "np.ndarray", pixel_inputs: Mapping[str, Any] | None) -> "np.ndarray":
        """Token embeddings with the image features written into the image-token positions (row-major
        order, like ``masked_scatter``)."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        embeds = self.embed(ids)
        slots = ids == self.image_token_id
        if not slots.any():
            return embeds
        if not pixel_inputs:
            raise InvalidOptionError(f"the prompt has {int(slots.sum())} image tokens but no pixel inputs were given")
        features = self.image_features(pixel_inputs)
        if features.shape[0] != int(slots.sum()):
            raise InvalidOptionError(
                f"image features and image tokens do not match: {features.shape[0]} feature rows for "
                f"{int(slots.sum())} image tokens in the prompt")
        embeds[slots] = features.astype(embeds.dtype)
        return embeds

    def prompt_positions(self, input_ids: "np.ndarray", attention_mask: "np.ndarray",
                         pixel_inputs: Mapping[str, Any] | None) -> tuple["np.ndarray", "np.ndarray"]:
        """(prompt position ids, per-row delta added to the running position at decode steps)."""
        import numpy as np

        batch = attention_mask.shape[0]
        if not self.mrope:
            return position_ids_from_mask(attention_mask, attention_mask.shape[1]), np.zeros((batch, 1), np.int64)
        grid = host(pixel_inputs["image_grid_thw"]) if pixel_inputs and "image_grid_thw" in pixel_inputs else None
        return mrope_position_ids(input_ids, grid, self.image_token_id, self.spatial_merge_size,
                                  attention_mask, self.video_token_id)

    def decode_positions(self, attention_mask: "np.ndarray", rope_delta: "np.ndarray", seq_len: int = 1) -> "np.ndarray":
        """Position ids of the last ``seq_len`` (new) tokens per row, given the mask including them (and, for
        multimodal RoPE, the prompt's ``rope_delta`` from :meth:`prefill`; 0 for text)."""
        import numpy as np

        pos = position_ids_from_mask(np.asarray(attention_mask, dtype=np.int64), seq_len)
        return np.broadcast_to(pos + rope_delta, (3, *pos.shape)).copy() if self.mrope else pos

    def forward(self, input_ids: "np.ndarray", attention_mask: "np.ndarray | None" = None,
                past: Sequence[tuple["np.ndarray", "np.ndarray"]] | None = None
                ) -> tuple["np.ndarray", list[tuple["np.ndarray", "np.ndarray"]]]:
        """Text tokens only, with :meth:`OrtDecoderRunner.forward`'s interface (prefill with ``past=None``,
        cached steps after): embeddings, then one decoder call; the mask covers past + new tokens."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = ids.shape
        past_len = past[0][0].shape[2] if past else 0
        mask = (np.ones((batch, past_len + seq), np.int64) if attention_mask is None
                else np.asarray(attention_mask, dtype=np.int64))
        positions = self.decode_positions(mask, np.zeros((batch, 1), np.int64), seq)
        return self.decode_step(self.embed(ids), mask, positions, past)

    def prefill(self, input_ids: "np.ndarray", pixel_inputs: Mapping[str, Any] | None = None,
                attention_mask: "np.ndarray | None" = None
                ) -> tuple["np.ndarray", list[tuple["np.ndarray", "np.ndarray"]], "np.ndarray"]:
        """Run the prompt: (logits [batch, seq, vocab], present cache, rope delta [batch, 1])."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        embeds = self.prompt_embeddings(ids, pixel_inputs)
        positions, delta = self.prompt_positions(ids, mask, pixel_inputs)
        logits, present = self.decode_step(embeds, mask, positions)
        return logits, present, delta

    # -- StepDecoder ---------------------------------------------------------------------------------
    def start(self, input_ids: Any, attention_mask: Any = None, inputs: Mapping[str, Any] | None = None
              ) -> tuple["np.ndarray", tuple[KV, "np.ndarray", "np.ndarray"]]:
        """The prompt (with images when ``inputs`` holds pixel inputs, else as :meth:`forward` runs text)."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if inputs is None:
            logits, present = self.forward(ids, mask)
            return logits, (present, mask, np.zeros((ids.shape[0], 1), np.int64))
        logits, present, delta = self.prefill(ids, inputs, mask)
        return logits, (present, mask, delta)

    def advance(self, next_ids: Any, state: tuple[KV, "np.ndarray", "np.ndarray"]
                ) -> tuple["np.ndarray", tuple[KV, "np.ndarray", "np.ndarray"]]:
        import numpy as np

        past, mask, delta = state
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        ids = np.asarray(next_ids, dtype=np.int64)
        logits, present = self.decode_step(self.embed(ids), mask, self.decode_positions(mask, delta), past)
        return logits, (present, mask, delta)

    def generate_greedy(self, input_ids: "np.ndarray", pixel_inputs: Mapping[str, Any] | None,
                        max_new_tokens: int, attention_mask: "np.ndarray | None" = None,
                        eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None
                        ) -> "np.ndarray":
        """Greedy decoding like transformers' ``generate(do_sample=False)`` (:func:`~skipit.runtime.base.greedy_decode`):
        prompt + new tokens.

        ``pixel_inputs`` is what the processor returned for the images (``pixel_values`` and, per
        architecture, ``pixel_attention_mask`` or ``image_grid_thw``; other keys are ignored). With
        ``eos_token_id``, finished rows continue with ``pad_token_id`` and decoding stops once all finished.
        """
        return greedy_decode(self, input_ids, max_new_tokens, attention_mask=attention_mask,
                             inputs=pixel_inputs or {}, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
