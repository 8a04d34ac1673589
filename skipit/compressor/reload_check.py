"""Reload a checkpoint with plain transformers and write its logits: run as a script in a fresh process.

    python reload_check.py MODEL_DIR INPUTS.safetensors OUT.safetensors

This file imports only torch, transformers and safetensors — never skipit — so a pass proves the
checkpoint stands on its own. It also checks that a cached generation runs and that tied embeddings
stayed tied, and writes a JSON line of facts to stdout.
"""

import json
import sys


def main(model_dir: str, inputs_path: str, out_path: str) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    config = transformers.AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config(decoder=True)
    is_vlm = text is not config
    auto = transformers.AutoModelForImageTextToText if is_vlm else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype="auto").eval()  # the saved dtype, as a user would load it
    inputs = load_file(inputs_path)
    with torch.inference_mode():
        logits = model(**inputs, use_cache=False).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=True)
    save_file({"logits": logits.contiguous(), "generated": gen.contiguous()}, out_path)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    facts = {
        "class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_hidden_layers": text.num_hidden_layers,
        "layer_types": getattr(text, "layer_types", None),
        "tied": head.weight.data_ptr() == emb.weight.data_ptr(),
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))),
    }
    print(json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:4])
