"""Low-rank updates of the base weight: LoRA and the methods built on its factors (DoRA, QLoRA,
AdaLoRA)."""
