"""dsserve: one inference server for DeepSeek models on NVIDIA, AMD, Xeon CPUs and Ascend NPUs."""
from dsserve.core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["Engine", "SamplingParams", "hookimpl", "__version__"]


def __getattr__(name: str):
    # The engine pulls in the model graphs; load it only when asked for.
    if name == "Engine":
        from dsserve.core.engine import Engine

        return Engine
    if name == "SamplingParams":
        from dsserve.core.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'dsserve' has no attribute {name!r}")
