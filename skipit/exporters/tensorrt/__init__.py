"""TensorRT engines from skipit's ONNX graphs, on Polygraphy.

==============  ====================================================================================
module          what it holds (everything but the engine build runs on any machine)
==============  ====================================================================================
``profiles``    ``--profiles`` parsing (:class:`ProfileSpec`) and the shape ranges of every graph input
``ops``         the operator pre-check against ``trt_ops.json`` (TensorRT's ONNX support table, as data)
``engine``      the engine build (Polygraphy ``CreateConfig`` / ``Profile`` / ``EngineBytesFromNetwork``),
                the sidecar recording what an engine was built for, and the compatibility check
==============  ====================================================================================

Running engines: :mod:`skipit.runtime.tensorrt`.
"""

from skipit.exporters.tensorrt.engine import INSTALL_HINT, PRECISIONS, EngineEnv, EngineSidecar, build_engine
from skipit.exporters.tensorrt.engine import check_engine_compatible, current_env, file_sha256, read_sidecar
from skipit.exporters.tensorrt.engine import sidecar_path, write_sidecar
from skipit.exporters.tensorrt.ops import TRT_ONNX_OPS, TRT_OPS_VERSION, TrtCompatibility, check_trt_compatibility
from skipit.exporters.tensorrt.profiles import PROFILE_EXAMPLE, ProfileSpec, Shape, ShapeRange, as_profiles
from skipit.exporters.tensorrt.profiles import default_max_context, parse_profile, parse_profiles
from skipit.exporters.tensorrt.profiles import polygraphy_profiles, shape_ranges

__all__ = [
    "INSTALL_HINT", "PRECISIONS", "PROFILE_EXAMPLE", "TRT_ONNX_OPS", "TRT_OPS_VERSION", "EngineEnv", "EngineSidecar",
    "ProfileSpec", "Shape", "ShapeRange", "TrtCompatibility", "as_profiles", "build_engine", "check_engine_compatible",
    "check_trt_compatibility", "current_env", "default_max_context", "file_sha256", "parse_profile", "parse_profiles",
    "polygraphy_profiles", "read_sidecar", "shape_ranges", "sidecar_path", "write_sidecar",
]
