"""Load generator, cost model and roofline. Talks to servers over HTTP only (no engine imports).

- prompts.py: synthetic prompts of exact token lengths (optional shared prefix) or prompts from a file
- stats.py: percentiles and per-level summaries
- client.py: one streaming request, timed token by token
- runner.py: one load level (fixed concurrency or Poisson arrivals), levels in a row, progress bar
- report.py: JSON, markdown table, PNG plot
- cost.py: machine price per hour -> exact cost and prices per 1M tokens
- roofline.py: memory bandwidth and matmul FLOP/s of this machine against a model's size
- cli.py: `llmaas bench`, `llmaas cost`, `llmaas roofline`
"""
