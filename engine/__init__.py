"""prefixq's inference engine: paged KV cache, continuous batching, our own model code."""
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput"]


def __getattr__(name):  # keep `import engine` light: torch loads only when the engine is used
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
