"""Pick the engine behind `--engine`: 'paged' (engine.llm_engine.LLMEngine) or 'hf'."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def paged_available() -> bool:
    try:
        import engine.llm_engine  # noqa: F401
        return hasattr(engine.llm_engine, "LLMEngine")
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False


def make_engine(kind: str | None, model: str, device: str | None = None, **cfg):
    """kind: 'paged', 'hf', or None/'auto' (paged when importable, else hf with a warning)."""
    kind = (kind or "auto").lower()
    if kind in ("auto", "paged"):
        try:
            from engine.llm_engine import LLMEngine
        except Exception as e:  # noqa: BLE001
            if kind == "paged":
                log.warning("paged engine unavailable (%s); falling back to --engine hf", e)
            else:
                log.info("paged engine unavailable (%s); using --engine hf", e)
            kind = "hf"
        else:
            kw = dict(cfg)
            if device is not None:
                kw["device"] = device
            return LLMEngine(model, **kw), "paged"
    if kind == "hf":
        from engine.hf_backend import HFEngine
        return HFEngine(model, device=device, **cfg), "hf"
    raise ValueError(f"unknown engine {kind!r} (use paged or hf)")
