"""Model loading: UNet, VAE, Whisper encoder, positional encoding, BiSeNet face parser, GFPGAN."""

from musetalk.models.bundle import SERVE_PARTS, ModelBundle, load_models, missing_files, weights_present

__all__ = ["SERVE_PARTS", "ModelBundle", "load_models", "missing_files", "weights_present"]
