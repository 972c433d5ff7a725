"""CPU TEST HARNESS ONLY: stands in for ``sgl_kernel`` (no CPU build exists on PyPI).

Any attribute is a function that raises when called, so imports succeed and any real use
is loud. See ../sglang_cpu_shim.py.
"""

__version__ = "0.4.10"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def _refuse(*args, **kwargs):
        raise RuntimeError(f"sgl_kernel.{name} is a CPU-harness placeholder and must not be called")

    _refuse.__name__ = name
    return _refuse
