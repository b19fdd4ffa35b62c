"""The OpenAI-compatible HTTP server: `mnemosyne serve`."""
