"""The transformers side (the only layer that imports transformers): the cache layer (`layer`) and cache
(`cache`), the ``"chunked_decomp"`` attention function (`attention`), `ChunkedDecomp`'s reversible wiring into a
model (`compressor`), what the library reads of a model (`models`) and model loading (`loading`)."""
