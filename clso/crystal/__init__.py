"""Crystalline matrices and what they become: the library the search picks from, the .crystal file,
its compiler, the C runtime that runs it (runtime/) and the fuzzing of its two readers."""
