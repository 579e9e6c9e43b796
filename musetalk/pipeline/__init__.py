"""Per-request generation: audio features, UNet/VAE, blending, encoding."""
