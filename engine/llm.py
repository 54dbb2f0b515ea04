"""Offline API: `LLM(model, **config).generate(prompts, sampling_params)`,
returning outputs in input order, as vLLM users expect."""
from __future__ import annotations

from typing import Sequence

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2", **config) -> None:
        self.engine = LLMEngine(model, **config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(token_ids)
        if len(sampling_params) != len(token_ids):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        for i, (ids, sp) in enumerate(zip(token_ids, sampling_params)):
            self.engine.add_request(str(i), ids, sp)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(token_ids), desc="generate")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                results[out.request_id] = out
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        return [results[str(i)] for i in range(len(token_ids))]

    def chat(self, messages_list, sampling_params=None) -> list[RequestOutput]:
        # Render to text, then encode: what tokenize=True returns differs across transformers versions.
        texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                 for m in messages_list]
        prompts = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return self.generate(prompts, sampling_params)
