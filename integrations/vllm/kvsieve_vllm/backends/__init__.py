"""One module per vLLM attention backend kvsieve maps."""
