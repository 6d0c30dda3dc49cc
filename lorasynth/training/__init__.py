"""Training: Lightning plumbing, the latent model, the hypernetwork (+ sampling calibration),
and identity LoRAs (DreamBooth + peft). Everything that fits a model lives here."""
