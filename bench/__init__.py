"""`make bench`: the gateway's throughput and latency against a direct call and a bare proxy."""
