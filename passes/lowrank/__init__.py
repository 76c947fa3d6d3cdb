"""Low-rank updates of the base weight: LoRA and the methods built on its factors (DoRA, QLoRA,
AdaLoRA), DeLoRA (normalised, bounded factors), AdaMSS (low-rank updates in clustered subspaces
of the weight's SVD), LoRA-XS (an r x r matrix between W's frozen SVD factors), MultiLoRA
(parallel units with learned scales) and DyLoRA (a rank drawn per step, any rank usable after)."""
