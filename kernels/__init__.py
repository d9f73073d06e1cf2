"""Triton kernels of attnpool, one module per op (installed as ``attnpool.kernels``).

On CPU tensors they run through Triton's interpreter (TRITON_INTERPRET=1 set
before triton is imported); that is how CI tests them.
"""
