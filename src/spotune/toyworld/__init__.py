"""The miniature world: a small text-to-image world where SPO's whole story runs on a CPU in minutes.

* :mod:`~spotune.toyworld.world`: shapes, named colours, captions, the train / held-out prompt split;
* :mod:`~spotune.toyworld.render`: 32x32 scenes (a shape on a background, with or without clutter);
* :mod:`~spotune.toyworld.metrics`: exact pixel metrics: alignment with the caption, layout, and a three-scale aesthetic (lighting, vividness, cleanliness);
* :mod:`~spotune.toyworld.components`: the SD1.5-family models of the world (VAE, UNet, text encoder, CLIP);
* :mod:`~spotune.toyworld.pretrain`: pre-training of the shipped base model and CLIP;
* :mod:`~spotune.toyworld.preferences`: generic preference pairs in Pick-a-Pic format;
* :mod:`~spotune.toyworld.evaluate`, :mod:`~spotune.toyworld.report`, :mod:`~spotune.toyworld.demo`: ``spotune demo``.
"""
