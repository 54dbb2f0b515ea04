"""Stop conditions after each appended token: EOS, stop token ids, max_tokens,
max_model_len and stop strings (matched on incrementally decoded text)."""
from __future__ import annotations

from engine.request import Request


class StopChecker:
    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len

    def check(self, req: Request, n: int) -> str | None:
        """Whether the request ends at its n-th output token (later ones may be placeholders)."""
        p = req.params
        t = req.output_token_ids[n - 1]
        if (not p.ignore_eos and t in self.eos_ids) or t in p.stop_token_ids:
            return "stop"
        if p.stop and self._stop_string_hit(req, n):
            return "stop"
        if n >= p.max_tokens or req.num_prompt_tokens + n >= self.max_model_len:
            return "length"
        return None

    def _stop_string_hit(self, req: Request, n: int) -> bool:
        # Decode only a tail window: enough tokens to hold the longest stop string
        # plus the new token, so a step costs O(window), not O(output).
        longest = max(len(s) for s in req.params.stop)
        window = req.output_token_ids[max(0, n - longest - 4):n]
        tail = self.tokenizer.decode(window, skip_special_tokens=True)
        return any(s in tail for s in req.params.stop)

    def final_text(self, req: Request) -> str:
        if not req.params.detokenize:
            return ""
        text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        if req.params.stop and req.finish_reason == "stop":
            cuts = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
            if cuts:
                text = text[:min(cuts)]  # the text ends before the stop string
        return text
