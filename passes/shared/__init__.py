"""Methods whose layers build their updates from one bank shared by the whole model: VB-LoRA
(a trained bank of vectors, mixed top-k per sub-vector) and UniLoRA (one trained vector, indexed
and scaled per layer)."""
