"""Export: from a diffusers checkpoint folder to verified static-shape ONNX artifacts.

Needs the `export` extra (torch, diffusers, transformers, onnx). Submodules import
torch themselves; importing this package alone stays cheap.
"""
