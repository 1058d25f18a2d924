"""Speed and memory benchmarks: jattn against its peers, measured in one run."""
