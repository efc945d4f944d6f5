"""Decoding modes (what a step computes) and what they share: prompts, sampling, statistics, the step protocol."""
