"""v2d's SLAM system: the keyframe front end, local-window optimisation and the run loop.

Depends on `v2d` (networks, geometry, I/O); `tools/` calls it.
"""
