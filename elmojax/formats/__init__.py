"""Formats: the files elmojax reads and writes, at the bottom of the package (imports nothing
of elmojax's above it). options.json (options), vocabulary files and `Batcher` ids (vocab),
bilm-tf's hdf5 weights (hdf5), TensorFlow checkpoints (tf_checkpoint, tf_variables), downloads
of them (remote); beneath those, atomic file writing and text reading (files), CRC-32C
(crc32c), nested dicts (dicts) and the checks of arguments where they enter (checks)."""
