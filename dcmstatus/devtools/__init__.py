"""Developer tools, imported only when used: the embedded servers and the
benchmark.
"""
