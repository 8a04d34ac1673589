"""skipit: remove decoder layers that measurably do nothing, with a verified certificate.

Pipeline, one verb per stage (see ``skipit.pipeline.compress`` for all of it in one call)::

    from skipit.compressor import load_model, decoder_spec, load_calibration, analyze, certify, remove_layers_
"""

__version__ = "0.1.0"
