"""Data: datasets as uint8 arrays (`dataset`, `sources/`), image decoding (`images`), the splits of a run
(`pipeline`) and augmentation inside the jitted step (`augment/`)."""
