"""The engine contract: tensor specs, the artifact manifest, and engine backends.

Shared by export (which writes artifacts) and the runtime (which loads them), so it
imports neither torch nor any backend at module level.
"""
