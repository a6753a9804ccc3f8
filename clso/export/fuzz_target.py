"""The atheris target process that clso.export.fuzz.run() starts: `python -m clso.export.fuzz_target ARGS`.

Kept apart from clso.export.fuzz so that the reader and the format are first imported here, under
atheris's instrumentation (a module imported before it gives libFuzzer no coverage to follow).
"""

import ctypes
import os
import sys

import atheris
import numpy  # noqa: F401  (imported before instrumentation: only the reader and the format are instrumented)
import torch  # noqa: F401

with atheris.instrument_imports(include=["clso.export.reader", "clso.export.format"]):
    from clso.export.format import CrystalFormatError
    from clso.export.reader import read_crystal

lib = ctypes.CDLL(os.environ["CLSO_FUZZ_LIBRARY"])
lib.crystal_validate.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
message = ctypes.create_string_buffer(256)


def one_input(data: bytes) -> None:
    try:
        read_crystal(data, verify_checksums=False)
        python_ok, why = True, ""
    except CrystalFormatError as e:
        python_ok, why = False, str(e)
    c_ok = lib.crystal_validate(data, len(data), 0, message, len(message)) == 0
    if python_ok != c_ok:
        raise AssertionError(f"readers disagree: python {'accepts' if python_ok else 'rejects (' + why + ')'}, "
                             f"C {'accepts' if c_ok else 'rejects (' + message.value.decode() + ')'}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
