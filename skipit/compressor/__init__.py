"""Stage one: load, describe, measure, certify and rewrite a model. Knows nothing of export."""

from skipit.compressor.analyze import AnalyzeConfig, LayerStats, analyze, run_pass
from skipit.compressor.arch import ArchSpec, DecoderSpec, decoder_spec, register, supported_architectures
from skipit.compressor.calibration import CalibrationSet, Sample, load_calibration
from skipit.compressor.batches import encode
from skipit.compressor.certify import certify
from skipit.compressor.certificate import Certificate, CertifyPolicy
from skipit.compressor.loading import LoadedModel, LoadOptions, load_model
from skipit.compressor.rewrite import remove_layers_, save_checkpoint, verify_reload

__all__ = [
    "AnalyzeConfig", "ArchSpec", "CalibrationSet", "Certificate", "CertifyPolicy", "DecoderSpec", "LayerStats",
    "LoadOptions", "LoadedModel", "Sample", "analyze", "certify", "decoder_spec", "encode", "load_calibration",
    "load_model", "register", "remove_layers_", "run_pass", "save_checkpoint", "supported_architectures", "verify_reload",
]
