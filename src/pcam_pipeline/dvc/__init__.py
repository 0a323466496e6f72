"""This clone's DVC set-up: where its cache and site cache live (cache) and the md5s DVC already
knows (state)."""
