"""From exact tokens to compressed chunks (torch and numpy, nothing of transformers).

`plan` composes the pieces a config names: the byte `budget`, the `chunking` of aged tokens, unit `weights`,
rank policies (`ranks`) and their scope (`allocation`: per layer or pooled), a layer's `shared_basis`, the
`factorizer` and the codec. `store` holds what a layer has aged out (sinks, chunks, basis); `engine` runs a
compression step over one or more layers, and `assembly` builds its chunks from the encoded stacks.
"""
