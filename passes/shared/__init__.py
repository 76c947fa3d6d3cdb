"""Methods whose layers build their updates from what the whole model shares: VB-LoRA (a trained
bank of vectors, mixed top-k per sub-vector), UniLoRA (one trained vector, indexed and scaled per
layer), RandLoRA (frozen random bases, scaled per layer), TinyLoRA (a vector tied across layers
mixing fixed random matrices) and FRoD (one basis per layer role)."""
