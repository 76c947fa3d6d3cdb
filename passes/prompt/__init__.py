"""Methods that act on the model call instead of on layers: prompt tuning, prefix tuning and
P-tuning v2 (`common` holds what they share, `graph` the prefix's route through traced regions)."""
