"""Pure-PyTorch oracles: slow, readable, float64-friendly. Imports torch only."""
