"""Build the compiled hot paths: every .pyx under src/ becomes an extension."""
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).parent
extensions = [
    Extension(
        ".".join(pyx.relative_to(ROOT / "src").with_suffix("").parts),
        [str(pyx.relative_to(ROOT))],
        extra_compile_args=["-O3"],
    )
    for pyx in sorted((ROOT / "src").rglob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
