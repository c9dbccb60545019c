"""Word-level LM quality benchmark: swap the input/output layers of an LSTM or Transformer LM
among nn.Embedding (untied, tied, tied + augmented loss), slim, adaptive input and DeFINE with
each ablation transform; report perplexity against parameters. Entry point: `python -m
bench.lm.train` (see its --help)."""
