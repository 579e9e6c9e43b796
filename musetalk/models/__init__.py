"""Model loading: UNet, VAE, Whisper encoder, positional encoding, BiSeNet face parser, GFPGAN."""

from musetalk.models.bundle import ModelBundle, load_models, missing_files, weights_present

__all__ = ["ModelBundle", "load_models", "missing_files", "weights_present"]
