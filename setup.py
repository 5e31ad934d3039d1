"""Build hook: every build of the package generates its gRPC code from protos/ (metadata is in pyproject.toml)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _protogen() -> ModuleType:
    # By path, not `import splitclip.protogen`: importing the package needs its runtime dependencies,
    # which the isolated build environment does not have.
    spec = importlib.util.spec_from_file_location("_splitclip_protogen", HERE / "splitclip" / "protogen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    """build_py that also compiles protos/splitclip.proto into splitclip/wire/."""

    def run(self) -> None:
        protogen = _protogen()
        if self.editable_mode:
            # An editable install imports the package from the source tree: generate it there.
            protogen.generate()
        super().run()
        if not self.editable_mode:
            # A wheel: into the build tree, so the source tree is left as it was.
            protogen.generate(Path(self.build_lib) / "splitclip" / "wire")


setup(cmdclass={"build_py": BuildPyWithProtos})
