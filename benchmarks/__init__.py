"""Throughput and memory measurements (`make bench`); figures are printed and written as JSON."""
