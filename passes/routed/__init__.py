"""Methods that route between adapters per input rather than adding one fixed update: Poly
(a per-task mixture over an inventory of LoRA skills) and MoLE (learned per-layer gates over
trained LoRA experts). Their updates depend on the input, so they do not merge."""
