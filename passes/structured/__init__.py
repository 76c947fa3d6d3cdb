"""Methods whose weight update has a fixed structure other than a plain low-rank product: MiSS
(one shared shard repeated over the weight), HiRA (the base weight times a low-rank product,
element-wise), GLoRA (a generalised prompt, scale and shift of weight and bias), DEFT (a
projection away from the base weight plus an injection), GraLoRA (a grid of small LoRAs),
PEANuT (a small network applied to the base weight), MoRA (a square matrix between fixed
compression and decompression) and LoRETTA (the update as a tensor train of small cores)."""
