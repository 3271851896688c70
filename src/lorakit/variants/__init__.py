"""LoRA variants that plug into the layer registry: DoRA, PiSSA/OLoRA inits, quantised bases."""
