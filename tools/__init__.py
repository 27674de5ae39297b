"""Tools beside the library: the data generator, bench, sweep, demo, weight measurement, fault loops.

The library (`pipeline`, `cache`) never imports from here.
"""
