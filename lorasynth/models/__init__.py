"""Models: the latent model of LoRA vectors (PCA, LoRA-VAE), the hypernetwork, and the model folder
that ties them to a pack (``from_pretrained`` / ``save_pretrained``). Plain torch: no Lightning here."""
