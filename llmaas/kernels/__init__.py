"""Native kernels: C++ loops the engine calls where torch would dispatch many small ops."""
