"""Export's built-in check, each ONNX graph in ONNX Runtime (CPU) against its torch
module on the same random inputs: the helpers live in engines/verify.py, shared with
`sdrt build` (engines/build.py), which must not import export."""

from sdrt.engines.verify import (FP32_TOLERANCE, StageCheck, compare, random_inputs, run_onnx, table,
                                 table_from_json, verify_tolerance)

__all__ = ["FP32_TOLERANCE", "StageCheck", "compare", "random_inputs", "run_onnx", "table", "table_from_json",
           "verify_tolerance"]
