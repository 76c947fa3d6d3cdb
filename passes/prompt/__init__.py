"""Methods that act on the model call instead of on layers: prompt tuning, P-tuning (v1, a prompt
encoder), multitask prompt tuning (prompts per task, ``task_ids`` in the call), prefix tuning and
P-tuning v2 (`common` holds what they share, `graph` the prefix's route through traced regions)."""
