"""Tensor maths only (torch and numpy, nothing of transformers): group quantisation with bit packing
(`quantization`), batched low-rank factorisers (`decomposition`), rotary embeddings undone and redone (`rotary`),
the stored form of a compressed chunk (`factors`) and a layer's chunks packed for a batched rebuild (`packed`)."""
