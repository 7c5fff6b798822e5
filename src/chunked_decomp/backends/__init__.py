"""The compute paths of attention over compressed chunks, and the choice between them (`dispatch`): the fused C++
kernel for the CPU (`cpu_kernel`, source in ``kernels/``), the Triton kernel for GPUs (`triton`) and the PyTorch
reference (`reference`), all reading a `context.FactoredContext`. Nothing here imports transformers."""
