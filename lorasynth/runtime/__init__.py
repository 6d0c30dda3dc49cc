"""Runtime: Stable Diffusion 1.5 on CPU: load a pipeline, fuse / restore LoRAs, generate, the tokenizer.

Sits on core and formats; the inference path of synthesis never imports it (diffusers is heavy)."""
