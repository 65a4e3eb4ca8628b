"""The Batch API: /v1/batches (routes.py), reading the input file (input.py), running the lines in idle
capacity through the same walk as an HTTP request (runner.py) and writing the output files (output.py)."""
