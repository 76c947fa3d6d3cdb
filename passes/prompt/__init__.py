"""Methods that act on the model call instead of on layers: prompt tuning, P-tuning (v1, a prompt
encoder), multitask prompt tuning (prompts per task, ``task_ids`` in the call), CPT (context
tokens plus a bounded delta, its own loss), prefix tuning, P-tuning v2, Cartridges (a trained
key/value cache) and LLaMA-Adapter (gated prompts in the top attention layers). `common` holds
what they share, `graph` the prefix's route through traced regions."""
