"""The library behind the entry points: loading and saving, data, weight averages, shared flags,
measurements, statistics and reports. Nothing here is run directly; the scripts at the top level are."""
