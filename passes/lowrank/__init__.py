"""Low-rank updates of the base weight: LoRA and the methods built on its factors (DoRA, QLoRA,
AdaLoRA), DeLoRA (normalised, bounded factors) and AdaMSS (low-rank updates in clustered
subspaces of the weight's SVD)."""
