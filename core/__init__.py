"""The shared core: what training writes and the service reads. The network definition, the
checkpoint format, the manifest schema and image preprocessing live here, and nothing here imports
the training loop or the serving stack."""
