"""The library behind the entry points: loading and saving, data, weight averages, shared flags, recipes and
presets, measurements, the report engine (tables.py) and the studies' reports (studies/). Nothing here is
run directly; the scripts at the top level are."""
