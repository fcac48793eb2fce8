"""helmlm's local lm-eval tasks: YAML configs, their JSONL data, and the loader they call (:mod:`.utils`)."""
