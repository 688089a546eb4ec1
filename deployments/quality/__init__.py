"""The line's quality control above the engine: which model (base, LoRA adapter, experiment
arm) answers a request, output filters, a result cache, and users' feedback."""
