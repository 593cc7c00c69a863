"""The one compiled part of lenet: the tutorial LeNet's two stages for CPU training steps.

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C
compiler, an unusual platform) the install goes on without it and training runs PyTorch's own
kernels for those stages (lenet/stages.py; a run's model card says which ran).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """GCC's and Clang's flags. (The source uses their vector extensions, so MSVC fails to
    build it, and the install goes on without it.)"""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type != "msvc":
            for extension in self.extensions:
                # -O3: the loops over a map's row vectorise; no -march: the AVX2 variant is
                # chosen at import, so one build runs on any x86-64 CPU.
                extension.extra_compile_args = ["-O3", "-Wno-psabi"]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "lenet._stages",
            sources=["src/lenet/_stages.c"],
            depends=["src/lenet/_stages_kernels.h"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
