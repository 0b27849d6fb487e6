"""Serving bundles to many users: Triton Inference Server model repositories (`triton_repo`, the
Python-backend models in `triton_models`, the server launcher `server`), a tritonclient example
(`client`) and a Ray Serve app (`ray_app`). Above the runtime: it imports the runtime, never the
export side, so a serving machine needs no torch."""
