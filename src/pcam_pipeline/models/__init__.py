"""The models (architectures), pretrained weights loaded into them (pretrained) and fetched
for them (weights)."""
