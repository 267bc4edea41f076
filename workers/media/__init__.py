"""Media pipeline of a service node: codecs, interactive apps, media wire messages.

Library code only: nothing here talks to Redis. The node loop and the client kernel see
``Encoder.encode(frame, pts, force_keyframe) -> packets`` and ``Decoder.decode(data) -> frames``;
every codec option lives in the codec module.
"""
