"""The model's parts beyond the text decoder in ``jaxllm.model``: the vision tower and its
projector, quantized layers, draft heads. One module per part."""
