"""Tasks over an adapted model: translation by routing keys."""
