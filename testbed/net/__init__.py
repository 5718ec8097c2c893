"""Links: describe them (LinkSpec, profiles, traces), plan the tc operations (pure), apply them (pyroute2).

Units live in names: ``rate_bps`` is bits per second, ``delay_us`` microseconds, ``loss_ppm`` parts per
million. Human strings such as "100mbit" or "5ms" are parsed once, at the CLI/config boundary, by
:mod:`testbed.net.units`. See docs/links.md.
"""
