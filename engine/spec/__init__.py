"""Speculative decoding building blocks: proposers, exact rejection sampling, adaptive k.

The engine owns scheduling, KV rollback and the forward pass; these modules are pure
(CPU-side proposers and controller, device-agnostic torch for verification).
"""
from engine.spec.adaptive import SpecController, SpecStats, StepCostModel, StepCostTable
from engine.spec.ngram import NgramProposer
from engine.spec.proposer import Proposer, ProbabilisticProposer
from engine.spec.rejection import SpecNoise, SpecOutput, counter_noise, generator_noise, rejection_sample
from engine.spec.suffix import SuffixProposer

__all__ = [
    "Proposer", "ProbabilisticProposer", "NgramProposer", "SuffixProposer",
    "rejection_sample", "SpecOutput", "SpecNoise", "counter_noise", "generator_noise",
    "SpecController", "SpecStats", "StepCostModel", "StepCostTable",
]
