"""Speed and scale measurements (throughput, latency, scaling, soak), each a script writing a result file."""
