"""Triton Python-backend models. They run inside tritonserver's Python stub (which provides
`triton_python_backend_utils`); a repository's `model.py` files import them from here, so the
served code is this package's, at the version installed next to the server."""
