"""Interoperability with peft directories (adapter_config.json + adapter_model.safetensors)."""
