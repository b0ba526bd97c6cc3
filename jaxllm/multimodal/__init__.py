"""Images into Llama 4 prompts: the image processor (Pillow + numpy), the prompt expansion of
each image placeholder, and the cache of encoded images. The vision tower itself is
``jaxllm.model.vision``."""
