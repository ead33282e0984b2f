"""`runner bench`: the batched sampler and the whole `runner run` against the Gemma Scope tutorial's loop.

May import anything in runner: it measures the product end to end.
"""
