"""Methods that route between adapters per input rather than adding one fixed update: Poly
(a per-task mixture over an inventory of LoRA skills), MoLE (learned per-layer gates over
trained LoRA experts), X-LoRA (a classifier on the hidden states scaling LoRA experts) and Arrow
(LoRA experts chosen per token by their SVD prototypes). Their updates depend on the input, so
they do not merge."""
