"""A module proxy that counts calls by name while the real module answers (tests/test_cuda_api.py
uses it in-process and in its subprocess)."""

from __future__ import annotations


class Recording:
    def __init__(self, module):
        self._module, self.calls = module, []

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if callable(value) and name[:2] in ("cu", "nv") and not isinstance(value, type):
            def call(*args, **kwargs):
                self.calls.append(name)
                return value(*args, **kwargs)
            return call
        return value
