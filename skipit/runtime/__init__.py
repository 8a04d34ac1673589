"""Running a model, one runner per backend, one greedy loop.

=================  ===============================================================================
module             what it holds
=================  ===============================================================================
``base``           the :class:`~skipit.runtime.base.Runner` protocol (what the speed measurement times),
                   the :class:`~skipit.runtime.base.StepDecoder` protocol, :func:`greedy_decode`,
                   host timing and memory
``torch_runner``   a transformers model (:class:`TorchRunner`) and transformers' own greedy generation
``decoder``        a merged decoder graph fed step by step, whatever backend runs it
``ort`` / ``ort_text`` / ``ort_vlm``   onnxruntime: sessions, the merged text decoder, the split VLM graphs
``tensorrt``       TensorRT engines through Polygraphy's ``TrtRunner``, and a decoder engine step by step
``llamacpp``       GGUF files in llama.cpp (node-llama-cpp), greedy continuations
=================  ===============================================================================
"""

from skipit.runtime.base import Runner, StepDecoder, greedy_decode

__all__ = ["Runner", "StepDecoder", "greedy_decode"]
