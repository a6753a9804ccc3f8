"""The export of a trained model to a .crystal file and the C runtime that runs it: the format
(format), its writer, its reader, the PyTorch reference (reference), the compile step's checks and
benchmarks (compile), the fuzzing of the two readers (fuzz) and the runtime itself (runtime/)."""
