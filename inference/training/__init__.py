"""Training the project's own shapes-world model (needs the ``train`` extra: torch).

Two stages, both on CPU by default (``--device cuda`` where a GPU is available):

1. :mod:`.vq` — a VQGAN on rendered scenes: a small strided-conv encoder (training only) and the
   inference engine's :class:`~inference.model.VQGANDecoder`, an EMA codebook initialised from
   encoder outputs with dead-code re-seeding, pixel + edge losses.
2. :mod:`.transformer` — the engine's DalleBart encoder/decoder on (caption, image codes) pairs,
   with caption dropout for classifier-free guidance (super-conditioning).

:mod:`.pipeline` runs both and exports the bundle (``dallebot train shapes --out DIR``).
"""
