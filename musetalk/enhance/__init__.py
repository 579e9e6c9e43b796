"""Face restoration with GFPGAN: alignment to the 512² template, batched restoration, paste-back, flicker control."""
