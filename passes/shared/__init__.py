"""Methods whose layers build their updates from what the whole model shares: VB-LoRA (a trained
bank of vectors, mixed top-k per sub-vector), UniLoRA (one trained vector, indexed and scaled per
layer), RandLoRA (frozen random bases, scaled per layer), TinyLoRA (a vector tied across layers
mixing fixed random matrices), FRoD (one basis per layer role), Lily (projectors shared across
layers, routed experts), Tied-LoRA (A and B tied across layers) and NOLA (mixtures of seeded
random bases)."""
