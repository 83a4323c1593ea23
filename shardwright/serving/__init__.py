"""Ray-free serving logic: the step scheduler, the KV block manager, sampling and request streams.

Nothing here imports Ray; the controller actors (`shardwright.actors`) drive these objects.
"""
