"""Scale-out: batch generation from a JSONL file (in-process or on Ray Data) and serving on Ray Serve."""
