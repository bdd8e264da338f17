"""poetlm: POET (orthogonal equivalence transformation) training for language models."""
